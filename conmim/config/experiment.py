"""The experiment: one typed model, the single source of truth for every knob. Its canonical form
and id live in :mod:`conmim.config.identity`; loading and ``--set`` in :mod:`conmim.config.loading`."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, model_validator

from conmim.config.errors import Strict


class DataConfig(Strict):
    name: Literal["fashion-mnist", "imagefolder", "parquet"] = "fashion-mnist"
    root: Optional[str] = Field(None, description="folder (fashion-mnist idx files, imagefolder) or .parquet file / folder")
    download: bool = Field(False, description="fashion-mnist only: fetch with torchvision when the files are absent (needs internet)")
    subset: Optional[int] = Field(None, ge=1, description="use only the first N training images (after the fixed shuffle)")
    eval_subset: Optional[int] = Field(None, ge=1, description="use only the first N validation and test images")
    val_size: int = Field(5000, ge=0, description="images held out of the training split for validation")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per Ray Train worker (decode, crop, "
                             "masks; benchmarks/input_pipeline.py says how many a GPU needs)")
    decode_draft: bool = Field(True, description="JPEG sources: decode at 1/2, 1/4 or 1/8 size when the crop still "
                               "spans the output size at that scale (PIL Image.draft; much cheaper, nearly the same pixels)")
    cache_dir: Optional[str] = Field(None, description="parquet only: a node-local folder for an Arrow IPC copy of "
                                     "the shards, memory-mapped so that every rank and loader worker of a node shares "
                                     "one copy of the images through the page cache (needs the set's size free on "
                                     "that disk); unset: each rank holds the images in its own memory, shared with its "
                                     "loader workers. Where a copy lies does not change the experiment (not in its id)")


BEIT_FAMILIES = ("beit_", "beitv2_")
LAYER_SCALE_FAMILIES = ("vit_", "deit", *BEIT_FAMILIES)  # timm's VisionTransformer and Beit take init_values


class ModelConfig(Strict):
    name: str = Field("vit_small_patch16_224", description="any timm ViT (vit_*, deit_*) or BEiT (beit_*) by name")
    img_size: int = Field(224, ge=8)
    patch_size: int = Field(16, ge=1)
    embed_dim: Optional[int] = Field(None, ge=8)
    depth: Optional[int] = Field(None, ge=1)
    num_heads: Optional[int] = Field(None, ge=1)
    layer_scale_init: Optional[float] = Field(None, gt=0, description="BEiT layer-scale init (0.1 for ViT-S/B)")
    shared_rel_pos_bias: bool = Field(False, description="BEiT models only: one relative position bias shared by all blocks")
    projector_hidden: int = Field(4096, ge=1)
    projector_out: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _patches_tile_image(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"model.patch_size={self.patch_size} must divide model.img_size={self.img_size}")
        if self.embed_dim and self.num_heads and self.embed_dim % self.num_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must divide model.embed_dim={self.embed_dim}")
        # knobs a model family cannot honour are refused, not dropped: a vit_* keeps its absolute
        # position embedding whatever shared_rel_pos_bias says, and the run would measure the wrong backbone
        if self.shared_rel_pos_bias and not self.name.startswith(BEIT_FAMILIES):
            raise ValueError(
                f"model.shared_rel_pos_bias=true needs a BEiT (model.name=beit_* or beitv2_*); {self.name} has an "
                f"absolute position embedding and no relative position bias, so the setting would be ignored. Use a "
                f"beit_* model (e.g. model.name=beit_base_patch16_224 with model.embed_dim/depth/num_heads for a "
                f"smaller one) or model.shared_rel_pos_bias=false")
        if self.layer_scale_init is not None and not self.name.startswith(LAYER_SCALE_FAMILIES):
            raise ValueError(
                f"model.layer_scale_init={self.layer_scale_init} needs a model with layer scale "
                f"({', '.join(f + '*' for f in LAYER_SCALE_FAMILIES)}); {self.name} has none, so the setting would "
                f"be ignored. Leave model.layer_scale_init unset (null) for it")
        return self

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


class MaskingConfig(Strict):
    enabled: bool = Field(True, description="false = no corruption: every patch is predicted from the unmasked view")
    type: Literal["block", "random", "random_cells"] = "block"
    ratio: float = Field(75 / 196, gt=0, lt=1)
    min_block_patches: int = Field(16, ge=1, description="block masking: smallest block, in patches")
    cell_size: int = Field(2, ge=1, description="random_cells: a cell is cell_size x cell_size patches")


class AugmentConfig(Strict):
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_p: float = Field(0.1, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = Field(0.2, ge=0, le=1)


class ObjectiveConfig(Strict):
    target_encoder: Literal["momentum", "shared"] = "momentum"
    stop_grad: bool = True
    perturbation: Literal["asymmetric", "symmetric_basic", "symmetric_strong", "switched"] = "asymmetric"
    temperature: float = Field(0.1, gt=0)
    momentum: Optional[float] = Field(0.996, ge=0, lt=1, description="start of the cosine schedule to 1.0")
    dictionary: Literal["image", "batch"] = Field(
        "image",
        description="negatives: other patches of the same image, or every patch of every image "
        "on this worker (with several Ray Train workers this is the paper's 'intra-GPU' dictionary)",
    )


# the modes of pretrain.compile that replay the step as CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class PretrainConfig(Strict):
    enabled: bool = Field(True, description="false = the paper's 'from scratch' row: fine-tune a random encoder")
    epochs: int = Field(300, ge=0)
    batch_size: int = Field(2048, ge=1, description="global batch, split over the Ray Train workers")
    accumulate: int = Field(1, ge=1, description="micro-batches per optimiser step: each worker computes "
                            "batch_size / (num_workers x accumulate) images at a time; the global batch, the lr and "
                            "momentum schedules and the loss normalisation stay (projector BatchNorm and "
                            "dictionary=batch's negatives: per micro-batch, as per GPU in the reference)")
    lr: float = Field(5e-4, gt=0)
    lr_batch_size: int = Field(2048, ge=1, description="lr is given for this global batch and scales linearly")
    min_lr: float = Field(1e-5, ge=0)
    warmup_epochs: float = Field(5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    clip_grad: Optional[float] = Field(None, gt=0)
    amp: bool = Field(False, description="bf16 autocast (GPU)")
    compile: Union[bool, Literal["reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = Field(
        False, description="torch.compile the model's step: true = Inductor's default mode; or a mode of "
        "torch.compile: 'reduce-overhead' (CUDA graphs: the step's ~1 000 kernel launches replayed as a few, for a "
        "loop the host cannot keep fed), 'max-autotune' (also tunes the matmuls, minutes of compilation; CUDA graphs "
        "too), 'max-autotune-no-cudagraphs'. Off a GPU the CUDA graphs are skipped; with accumulate > 1 they are refused "
        "(torch's CUDA graphs do not add up micro-batches' gradients)")
    attention: Literal["sdpa", "flex"] = Field(
        "sdpa", description="how the compiled step computes BEiT's attention with its relative position bias: 'sdpa' "
        "(torch's memory-efficient kernel, which takes the bias as a dense mask) or 'flex' (FlexAttention: the bias "
        "added to the scores inside a kernel Inductor writes for it). The same maths; 'flex' needs pretrain.compile and a "
        "BEiT with model.shared_rel_pos_bias=true, and runs on a GPU only (elsewhere, and uncompiled, SDPA)")
    sync_bn: bool = Field(False, description="SyncBatchNorm in the projectors (the reference uses per-worker BN)")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    log_every: int = Field(0, ge=0, description="steps between reading the loss statistics back from the device "
                           "(a NaN is caught there, naming the steps); 0 = once per epoch")


class FinetuneConfig(Strict):
    epochs: int = Field(100, ge=0)
    labels_per_class: Optional[int] = Field(None, ge=1, description="low-label fine-tuning: only this many labelled "
                                            "training images per class (a class-balanced subset drawn from the seed, "
                                            "the same in every trial of that seed); null = every label")
    batch_size: int = Field(1024, ge=1, description="global batch, split over the Ray Train workers")
    accumulate: int = Field(1, ge=1, description="micro-batches per optimiser step: each worker computes "
                            "batch_size / (num_workers x accumulate) images at a time (mixup pairs within one)")
    lr: float = Field(4e-3, gt=0)
    lr_batch_size: int = Field(1024, ge=1)
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(20, ge=0)
    layer_decay: float = Field(0.65, gt=0, le=1)
    drop_path: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.8, ge=0)
    cutmix: float = Field(1.0, ge=0)
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="random resized crop scale of the labelled images")
    randaug: Optional[str] = Field("rand-m9-mstd0.5-inc1", description="timm RandAugment spec, null for none")
    random_erasing: float = Field(0.25, ge=0, le=1)
    encoder: Literal["momentum", "online"] = Field("momentum", description="which pre-trained encoder to fine-tune")
    amp: bool = Field(False, description="bf16 autocast (GPU), also for the probes' features and top-1")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    log_every: int = Field(0, ge=0, description="steps between reading the loss back from the device; 0 = once per epoch")


class EvalConfig(Strict):
    linear_probe: bool = True
    probe_epochs: int = Field(30, ge=1)
    knn: bool = True
    knn_k: int = Field(20, ge=1)
    proxy_every: int = Field(0, ge=0, description="k-NN proxy on the validation split every N pre-training epochs (0 = off)")
    probe_online: bool = Field(False, description="also probe the online encoder (k-NN, linear probe, the per-epoch "
                               "proxy) when the fine-tuned one is the momentum encoder")
    full_label_finetune: bool = Field(False, description="with finetune.labels_per_class: also fine-tune on every label "
                                      "(finetune_full_top1, a secondary column)")
    test_split: bool = Field(
        True, description="evaluate on the test split (the probes and finetune_top1); false: the validation split only, "
        "no probes, finetune_top1 NaN (every trial of a sweep's selection stage: selection reads validation only)")
    probe_train_per_class: Optional[int] = Field(
        None, ge=1, description="the k-NN bank and the linear probe's training set: this many images of every class, a "
        "fixed class-balanced subset of the training split (the same images in every trial and seed); null = the whole "
        "split. The test split is always whole")


class ResourcesConfig(Strict):
    num_workers: int = Field(1, ge=1, description="Ray Train workers per trial")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    threads_per_worker: Optional[int] = Field(None, ge=1, description="torch intra-op threads of a worker, and of "
                                              "`--backend process` (default: cpus_per_worker)")
    max_failures: int = Field(2, ge=0, description="Ray Train: restarts of a trial's worker group from its latest "
                              "checkpoint after a worker dies (the sweep's max_failures are Tune's retries of a trial)")
    collective_timeout_s: int = Field(
        1800, ge=1, description="seconds a rank waits in a collective (all-reduce, all-gather, barrier) before the "
        "trial fails and is restarted from its checkpoint: Ray Train's TorchConfig(timeout_s), and the timeout of any "
        "process group the project starts itself")

    @property
    def threads(self) -> int:
        """torch's intra-op threads for one worker: its float reductions, and so its numbers, depend on
        them, so a run's config fixes them on every backend (never "as many as this machine has")."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


class DebugConfig(Strict):
    """Fault injection for tests of recovery; leave unset in real runs."""
    crash_at_step: Optional[int] = Field(None, ge=0, description="a worker calls os._exit at this global step, once")
    kill_at_step: Optional[int] = Field(None, ge=0, description="a worker sends itself SIGKILL at this global step, once")
    nan_at_step: Optional[int] = Field(None, ge=0, description="the loss becomes NaN at this step")
    log_steps: bool = Field(False, description="record the loss of every optimiser step (pre-training's in "
                            "result.json; fine-tuning's in finetune()'s return value)")
    dump_replicas: bool = Field(False, description="every worker saves its final weights to out/replicas/ (to check replicas agree)")
    float64: bool = Field(False, description="pre-train in float64, so that runs which differ only in float32 "
                          "reduction order (1 vs 2 workers) can be compared step by step")


class ExperimentConfig(Strict):
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    augment: AugmentConfig = AugmentConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    eval: EvalConfig = EvalConfig()
    resources: ResourcesConfig = ResourcesConfig()
    debug: DebugConfig = DebugConfig()

    @model_validator(mode="before")
    @classmethod
    def _masking_false_shorthand(cls, data: Any):
        if isinstance(data, dict) and isinstance(data.get("masking"), bool):
            data = {**data, "masking": {"enabled": data["masking"]}}
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.data.name == "imagefolder" and not self.data.root:
            raise ValueError("data.root is required for data.name=imagefolder (the folder holding train/ and val/)")
        if self.data.name == "parquet" and not self.data.root:
            raise ValueError("data.root is required for data.name=parquet (a .parquet file or a folder of them)")
        if self.resources.use_gpu and self.resources.gpus_per_worker == 0:
            raise ValueError("resources.gpus_per_worker must be > 0 when resources.use_gpu is true")
        for phase in ("pretrain", "finetune"):
            p, w = getattr(self, phase), self.resources.num_workers
            if p.batch_size % (w * p.accumulate):
                raise ValueError(
                    f"{phase}.batch_size={p.batch_size} must be divisible by resources.num_workers={w} x "
                    f"{phase}.accumulate={p.accumulate} = {w * p.accumulate} (it is the global batch; each worker "
                    f"computes {phase}.accumulate micro-batches of batch_size / (num_workers x accumulate) "
                    f"images per step)")
        f = self.finetune
        if (f.mixup > 0 or f.cutmix > 0) and self.micro_batch("finetune") % 2:
            raise ValueError(
                f"finetune.mixup={f.mixup} / finetune.cutmix={f.cutmix} pair the images of a micro-batch, so it must be "
                f"even, but finetune.batch_size={f.batch_size} / (resources.num_workers={self.resources.num_workers} x "
                f"finetune.accumulate={f.accumulate}) = {self.micro_batch('finetune')}; change one of them, or set "
                f"finetune.mixup=0 and finetune.cutmix=0")
        if self.pretrain.compile in CUDA_GRAPH_MODES and self.pretrain.accumulate > 1:
            raise ValueError(
                f"pretrain.compile={self.pretrain.compile} (CUDA graphs) cannot be combined with pretrain.accumulate="
                f"{self.pretrain.accumulate}: torch's CUDA graphs overwrite a micro-batch's gradients with the next "
                f"one's instead of adding them (pytorch/pytorch#169545); use pretrain.compile=true or "
                f"max-autotune-no-cudagraphs, or pretrain.accumulate=1 with more workers")
        if self.pretrain.attention == "flex" and not (self.pretrain.compile is not False and self.model.shared_rel_pos_bias
                                                      and self.model.name.startswith(BEIT_FAMILIES)):
            raise ValueError(
                f"pretrain.attention=flex needs pretrain.compile on (it is {self.pretrain.compile}) and a BEiT with a "
                f"relative position bias, model.name=beit_* and model.shared_rel_pos_bias=true (they are "
                f"{self.model.name} and {self.model.shared_rel_pos_bias}): FlexAttention computes that bias inside a "
                f"compiled kernel, and anything else would run SDPA unchanged; use pretrain.attention=sdpa")
        return self

    # -- views ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        return flatten(self.to_dict())

    def micro_batch(self, phase: str) -> int:
        """Images one worker computes at a time in ``phase`` (pretrain, finetune): its per-GPU batch."""
        p = getattr(self, phase)
        return p.batch_size // (self.resources.num_workers * p.accumulate)

    def dictionary_size(self) -> int:
        """Candidates each masked patch picks its own key among in pre-training: the P patches of its
        image, or (``objective.dictionary: batch``) every patch of the worker's micro-batch. ln of it
        is the loss at chance."""
        patches = self.model.grid ** 2
        return patches * (self.micro_batch("pretrain") if self.objective.dictionary == "batch" else 1)

    def batch_split(self) -> str:
        """How each phase's global batch is split: workers x micro-batches (``conmim validate`` prints it)."""
        return ", ".join(f"{ph} {self.micro_batch(ph)} ({getattr(self, ph).batch_size} / {self.resources.num_workers} "
                         f"workers / accumulate {getattr(self, ph).accumulate})" for ph in ("pretrain", "finetune"))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
