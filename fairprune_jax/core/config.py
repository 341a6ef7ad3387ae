"""The run configuration and the choices it names, importable without JAX.

``fairprune --help`` builds its parser from :class:`RunConfig`'s defaults, so
this module must not import jax, flax or optax (the CLI answers in well under
a second only while that holds; ``tests/test_cli.py`` checks it).
"""
from __future__ import annotations

import dataclasses

#: Optimizers of the dense training and fine-tuning (``train.make_optimizer``).
OPTIMIZERS = ("adam", "sgd")
#: The psi bound a certificate checks when neither ``certify_eps`` nor the method's ``eps`` option sets one.
DEFAULT_CERTIFY_EPS = 0.01
#: The dataset of the main job: UCI Adult, embedded in the package (its test split has 5,421 women and 10,860
#: men, enough rows to certify a per-group bound near 0.01; digits' 45-row classes have a floor of 0.13: an
#: unchanged model would be certified no tighter).
DEFAULT_DATASET = "adult"
#: The model zoo's names (``models.MODELS`` holds the classes; here for ``--help``, which imports no JAX).
MODEL_NAMES = ("cnn", "mlp", "mobilenet_v2", "resnet", "resnet18", "resnet34", "vit")
#: Dense training epochs when none are given: 30, or fewer for a dataset with many rows per epoch (the main
#: job on Adult stays under a minute on 2 CPU cores with 10).
DEFAULT_EPOCHS = 30
DATASET_EPOCHS = {"adult": 10}


def default_epochs(dataset: str) -> int:
    """The dense training epochs of ``dataset`` when none are given."""
    return DATASET_EPOCHS.get(dataset, DEFAULT_EPOCHS)


#: How named random streams derive from the run's seed (RunConfig.streams).
STREAM_MODES = ("fold_in", "offset")
#: Run settings added after results existed, whose default then changed what a run computes: the value a
#: result that does not record the setting ran with (compare refuses to reuse it under another value).
LEGACY_RUN_VALUES = {"streams": "offset"}
#: Words read as a boolean option's value, in any case (one place for the CLI, TOML files and the API).
BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


@dataclasses.dataclass
class RunConfig:
    """Every knob of a ``fairprune run``; defaults give the main job (ceag on the embedded Adult)."""

    method: str = "ceag"
    dataset: str = DEFAULT_DATASET
    data_dir: str | None = None
    model: str | None = None            # None: mlp for tabular, cnn for images
    sparsity: float = 0.9
    seed: int = 0
    epochs: int | None = None           # dense training; None: default_epochs(dataset)
    finetune_epochs: int | None = None  # None: same as epochs
    batch_size: int = 64
    lr: float = 1e-3
    finetune_lr: float | None = None    # None: same as lr
    optimizer: str = "adam"
    weight_decay: float = 0.0
    distribution: str = "uniform"
    exclude_first: bool = False
    exclude_last: bool = False
    positive_label: int = 1
    augment: bool = False
    eval_batch_size: int = 512
    out: str | None = None
    save_compact: bool = False          # structured methods: also write OUT/compact (the physically smaller model)
    progress: bool = True
    # The per-group certificate on test (certify.py): psi bound (None: the method's ``eps`` option, else
    # DEFAULT_CERTIFY_EPS), family-wise confidence level, optional bound for DP / EO differences.
    certify_eps: float | None = None
    certify_level: float = 0.95
    certify_interval: str = "mover"     # psi_g interval construction: mover (default) or exact (conservative)
    fairness_bound: float | None = None
    small_group: int = 30               # groups with fewer test rows are marked small
    # How a method's named random streams derive from the seed (methods/base.py): fold_in (the default: each
    # stream its own jax.random.fold_in key of the seed) or offset (seed + a fixed offset per stream, what
    # every earlier result used; streams of nearby seeds overlap).
    streams: str = "fold_in"
    dataset_options: dict = dataclasses.field(default_factory=dict)
    model_options: dict = dataclasses.field(default_factory=dict)
    method_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs is None:
            self.epochs = default_epochs(self.dataset)

    @property
    def ft_epochs(self) -> int:
        return self.epochs if self.finetune_epochs is None else self.finetune_epochs

    @property
    def ft_lr(self) -> float:
        return self.lr if self.finetune_lr is None else self.finetune_lr

#: N:M patterns (``masks.nm_mask``): in every group of M consecutive input entries of a kernel, N are kept (the
#: 2:4 pattern sparse tensor cores run natively); sparsity is then exactly 1 - N/M.
NM_PATTERNS = ("2:4", "4:8", "1:4")
#: How a target sparsity is spread over layers (``masks.keep_counts``), or an N:M pattern.
DISTRIBUTIONS = ("uniform", "global", "erk") + NM_PATTERNS
#: The certificate's psi_g interval constructions (``certify.PSI_METHODS``; repeated here to stay JAX-free).
CERTIFY_INTERVALS = ("mover", "exact")

