"""Peak CPU RAM, device memory and disk of each stage, estimated from a ModelShape and the stage's options.

Every number is bytes *above* the process's floor (Python with torch and transformers imported: RUNTIME_BYTES), so
a test can compare it with a measured peak RSS minus the RSS after imports. The terms (`parts`) say where the bytes
go; their constants are the code's own layout (DESIGN.md: the sequential driver, the Trainer, the merge), checked
against measured peaks by tests/test_memory_plan.py and benchmarks/memory_plan.py. Pure arithmetic: no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from spp_cli.memory_plan.shape import DTYPE_BYTES, ModelShape

GiB = 1024**3
MiB = 1024**2
RUNTIME_BYTES = 700 * MiB  # Python + torch + transformers (+ peft, lm-eval) imported, before any weight
CHUNK_TOKENS = 2048  # pruners/sequential.py: calibration windows per forward, up to this many tokens
SAVE_TOTAL_LIMIT = 2  # spp_cli/training/trainer.py: Trainer checkpoints kept for resume
MERGE_BYTES = 4  # the merge computes in float32 (spp_cli/stages/merge.py MERGE_DTYPE)
# measured, not derived (benchmarks/memory_plan.py, the same on a 0.1 and a 0.5 GB model): the tokenized training
# records of builtin:python-docs, the Trainer and its data loader; the evaluation's tokenized text
TRAINER_BYTES = 150 * MiB
EVAL_DATA_BYTES = 16 * MiB


@dataclass
class StagePlan:
    """One stage's estimated peaks. device_bytes is None when the CPU computes (everything is CPU RAM)."""

    stage: str  # prune | finetune | merge | eval
    device: str  # where it computes: cpu, cuda, cuda:1
    cpu_bytes: int
    device_bytes: int | None
    disk_bytes: int
    parts: dict[str, int] = field(default_factory=dict)  # the named terms, bytes
    assumed: dict = field(default_factory=dict)  # the options the numbers depend on (streaming, micro batch...)
    fixes: list[str] = field(default_factory=list)  # what does not fit, and the option that would make it fit

    def as_dict(self) -> dict:
        return asdict(self)


def element_bytes(dtype: str | None, shape: ModelShape) -> int:
    """Bytes per weight element in `dtype` (auto/None: the checkpoint's own)."""
    return DTYPE_BYTES.get(dtype or "auto", DTYPE_BYTES[shape.stored_dtype])


def _on_device(device: str) -> bool:
    return device.startswith("cuda")


def prune_estimate(shape: ModelShape, *, method: str, nsamples: int, seqlen: int | None, calibrated: bool,
                   streamed: bool, device: str = "cpu", dtype: str | None = None) -> StagePlan:
    """The sequential driver: the model (streamed: the embedding and two blocks, the one pruned and the one its
    writer thread is still saving: stages/streamed_checkpoint.BackgroundWriter) in the compute dtype, the
    calibration activations (inputs and outputs of a block: 2 x nsamples x seqlen x hidden), one block's statistics
    (SparseGPT: an fp32 Hessian per distinct linear input, and its factor) and one forward's intermediates
    (CHUNK_TOKENS tokens at a time)."""
    size = element_bytes(dtype, shape)
    seqlen = seqlen or min(2048, shape.max_positions)
    block = shape.block_parameters * size
    weights = (shape.vocab * shape.hidden * size + 2 * block) if streamed else shape.parameters * size
    activations = 2 * nsamples * seqlen * shape.hidden * size if calibrated else 0
    inputs = sorted({features for features, _ in shape.linears})
    hessians = 2 * sum(4 * features**2 for features in inputs) if method == "sparsegpt" else 0
    tokens = max(seqlen, min(CHUNK_TOKENS, nsamples * seqlen))
    forward = tokens * (4 * shape.hidden + 3 * shape.intermediate) * 4 if calibrated else 0
    parts = {"weights": weights, "calibration activations": activations, "statistics": hessians, "forward": forward}
    disk = shape.stored_bytes + (nsamples * seqlen * shape.hidden * size if streamed and calibrated else 0)
    assumed = {"streaming": streamed, "nsamples": nsamples, "seqlen": seqlen, "method": method}
    if not _on_device(device):
        return StagePlan("prune", device, sum(parts.values()), None, disk, parts, assumed)
    # on a GPU: one block, its statistics and forward there (the activations too, when they fit: the driver's
    # _activation_device); the model stays in CPU RAM
    device_bytes = block + hessians + forward + activations
    return StagePlan("prune", device, weights, device_bytes, disk, parts, assumed)


def trainable_parameters(shape: ModelShape, method: str, *, groups: int = 16, rank: int = 8) -> int:
    """Trainable elements of a recovery method on every block's prunable linears (spp_cli/adapters)."""
    per_block = {
        "spp": sum(groups * i + o for i, o in shape.linears),  # alpha (G x in) and beta (out)
        "lora": sum(rank * (i + o) for i, o in shape.linears),
        "masked-lora": sum(rank * (i + o) for i, o in shape.linears),
        "ia3": sum(o for _, o in shape.linears),
        "masked-full": sum(i * o for i, o in shape.linears),
    }
    return shape.blocks * per_block.get(method, per_block["lora"])


def activation_bytes(shape: ModelShape, tokens: int, size: int, checkpointing: bool) -> int:
    """What backward keeps for `tokens` tokens of a micro batch: per block about 16 hidden-wide and 5
    intermediate-wide values a token (norms, q/k/v, RoPE, attention, the gated MLP), or with gradient checkpointing
    only each block's input plus one block's worth; and the fp32 logits, their log-softmax and gradient."""
    per_block = tokens * (16 * shape.hidden + 5 * shape.intermediate) * size
    saved = (shape.blocks * tokens * shape.hidden * size + per_block) if checkpointing else shape.blocks * per_block
    return saved + 3 * tokens * shape.vocab * 4


def finetune_estimate(shape: ModelShape, *, method: str, micro_batch_size: int, seqlen: int,
                      gradient_checkpointing: bool, device: str = "cpu", dtype: str | None = None,
                      groups: int = 16, rank: int = 8, merge: str = "streaming",
                      teacher: ModelShape | None = None) -> StagePlan:
    """The Trainer on one process: the model in its training dtype (float32 on a CPU), the trainable parameters,
    their gradients and AdamW's two moments (float32 for adapters; masked-full trains the weights themselves and
    keeps a support mask of the same size), the activations of one micro batch, then the merge (`merge`:
    streaming, memory, or none for --no-merge). `teacher`: a distillation teacher's shape, its frozen weights and
    its logits on top (None: no teacher)."""
    size = 4 if not _on_device(device) and dtype in (None, "auto") else element_bytes(dtype, shape)
    trainable = trainable_parameters(shape, method, groups=groups, rank=rank)
    state_size = size if method == "masked-full" else 4
    tokens = micro_batch_size * seqlen
    parts = {
        "weights": shape.parameters * size,
        "trainable, gradients, AdamW": trainable * state_size * (4 if method == "masked-full" else 3),
        "support masks": shape.adapted_weights * (size if method == "masked-full" else 1)
        if method in ("masked-full", "masked-lora") else 0,
        "activations": activation_bytes(shape, tokens, size, gradient_checkpointing),
        "teacher": (teacher.parameters * size + 2 * tokens * teacher.vocab * 4) if teacher is not None else 0,
        "training data, Trainer": TRAINER_BYTES,
    }
    merging = {"streaming": streaming_merge_bytes(shape),
               "memory": shape.parameters * DTYPE_BYTES[shape.stored_dtype], "none": 0}[merge]
    adapter_file = trainable * state_size
    disk = (shape.stored_bytes if merge != "none" else 0) + adapter_file + SAVE_TOTAL_LIMIT * 3 * adapter_file
    assumed = {"method": method, "micro_batch_size": micro_batch_size, "seqlen": seqlen,
               "gradient_checkpointing": gradient_checkpointing, "merge": merge, "teacher": teacher is not None}
    training = sum(parts.values())
    if not _on_device(device):
        # the merge runs after training; the model, its adapter and the optimizer are still held then
        parts["merge"] = merging
        return StagePlan("finetune", device, training + merging, None, disk, parts, assumed)
    # on a GPU the model is read into CPU RAM first, then moved; the merge reads the parent from disk
    cpu = max(shape.parameters * size, merging)
    return StagePlan("finetune", device, cpu, training, disk, parts | {"merge": merging}, assumed)


def streaming_merge_bytes(shape: ModelShape) -> int:
    """A streaming merge holds one tensor at a time: the largest copied as stored (the embedding), or the largest
    adapted linear in float32 with its merged result."""
    return shape.largest_tensor * DTYPE_BYTES[shape.stored_dtype] + 2 * shape.largest_linear * MERGE_BYTES


def merge_estimate(shape: ModelShape, *, adapter: int, streamed: bool) -> StagePlan:
    """`spp merge` of an adapter of `adapter` bytes: streaming, one float32 tensor in, its merged copy and its
    stored-dtype copy out, and the adapter; in memory, the whole base in float32 and its copy in the stored dtype."""
    if streamed:
        parts = {"tensors in flight": streaming_merge_bytes(shape), "adapter": adapter}
    else:
        stored = DTYPE_BYTES[shape.stored_dtype]
        parts = {"base in float32": shape.parameters * MERGE_BYTES, "adapter": adapter,
                 "stored copy": shape.parameters * stored if stored != MERGE_BYTES else 0}
    return StagePlan("merge", "cpu", sum(parts.values()), None, shape.stored_bytes + adapter, parts,
                     {"streaming": streamed})


def eval_estimate(shape: ModelShape, *, batch_size: int, seqlen: int | None, device: str = "cpu",
                  dtype: str | None = None, device_map: str | None = None) -> StagePlan:
    """One model at a time: its weights in the compute dtype and one forward of `batch_size` windows (the fp32
    logits and their log-softmax, and a block's intermediates). With a device map the weights that do not fit the
    device stay in CPU RAM (or an offload folder)."""
    size = element_bytes(dtype, shape)
    seqlen = seqlen or min(2048, shape.max_positions)
    tokens = batch_size * seqlen
    parts = {"weights": shape.parameters * size, "logits": 2 * tokens * shape.vocab * 4,
             "forward": tokens * (4 * shape.hidden + 3 * shape.intermediate) * size, "data": EVAL_DATA_BYTES}
    assumed = {"batch_size": batch_size, "seqlen": seqlen, "device_map": device_map}
    if not _on_device(device):
        return StagePlan("eval", device, sum(parts.values()), None, 0, parts, assumed)
    # read into CPU RAM, then moved (a device map places each block where it fits instead)
    return StagePlan("eval", device, parts["weights"], sum(parts.values()), 0, parts, assumed)
