"""Decoder-only LM (Llama architecture) on the Python help topics (``pydoc_data``).

Commands:
    python -m experiments.train_lm --config experiments/configs/lm.py              # BPE (1024)
    python -m experiments.train_lm --config experiments/configs/lm.py:linear       # linear attention
    python -m experiments.train_lm --config experiments/configs/lm.py:byte         # byte-level
    # overrides: --set train.num_steps=200 --set model.dim=128 --set run_dir=runs/x

Data: the 79 topics of ``pydoc_data.topics`` (ships with CPython), split by topic (seed 0: 71
train / 8 validation topics, 429k / 64k bytes); chunks of <= row_length tokens with a BOS,
packed into rows with segment ids. Evaluation: validation bits per byte.
Expected runtime and result (measured 2026-12-01, 2 idle CPU cores): ~6 min; validation 1.89 bits/byte
(curve in the README's LM section; linear preset 2.03, byte preset 2.05 at the same 400 steps).
A rerun with the same run_dir resumes from its newest intact checkpoint.
"""
import ml_collections

from research.data.corpus import CORPORA
from research.lm.config import ATTENTIONS
from research.lm.data import ROW_MODES
from research.lm.tokenizer import TOKENIZERS
from research.nn.attention import IMPLS
from research.runs.config import check, check_choice, check_positive


PRESETS = ("linear", "byte", "smoke", "draft")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "lm"
    c.run_dir = ""  # empty: runs/<name>
    c.seed = 0
    c.resume = "auto"  # "auto" | "force" | "never" (see experiments.common.open_run)

    c.data = ml_collections.ConfigDict()
    c.data.corpus = "pydoc"
    c.data.val_fraction = 0.1
    c.data.split_seed = 0
    c.data.tokenizer = "bpe"  # "bpe" (trained on the train split, saved as tokenizer.json) | "byte" (258 ids)
    c.data.bpe_vocab = 1024
    c.data.tokenizer_path = ""  # a tokenizer.json to reuse instead of training one (draft models)
    c.data.row_length = 256
    c.data.rows = "packed"  # "packed" (segment ids) | "single" (one chunk per row; linear attention)

    c.model = ml_collections.ConfigDict()
    c.model.dim = 256
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.mlp_hidden = 0  # 0: Llama's 8/3 * dim rounded to 16
    c.model.rope_theta = 10000.0
    c.model.tie_embeddings = True
    c.model.attention = "softmax"
    c.model.attn_impl = "xla"
    c.model.remat_policy = "none"
    # CPU speed: blocks unrolled and the CPU-friendly weight-gradient matmul (1.33x the scanned,
    # plain-autodiff step on 2 cores; experiments/bench_lm.py); set both the other way on a GPU/TPU
    c.model.scan_layers = False
    c.model.custom_matmul_vjp = True

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 400
    c.train.stop_at_step = 0  # >0: stop after this step (simulated pre-emption)
    c.train.batch_size = 16
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 50
    c.train.weight_decay = 0.1
    c.train.clip_norm = 1.0
    c.train.log_every = 25
    c.train.eval_every = 50
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    c.train.progress = True

    c.sample = ml_collections.ConfigDict()
    c.sample.num_prompts = 4  # held-out prompts: the start of the first validation documents
    c.sample.prompt_chars = 48
    c.sample.max_new_tokens = 96
    c.sample.temperature = 0.8
    c.sample.top_k = 40  # 0: no top-k
    c.sample.top_p = 1.0

    if preset == "linear":
        c.name = "lm_linear"
        c.model.attention = "linear"
        c.model.num_kv_heads = 4
        c.data.rows = "single"
    elif preset == "byte":
        c.name = "lm_byte"
        c.data.tokenizer = "byte"
    elif preset == "draft":  # the small draft model of experiments/bench_decoding.py (shares runs/lm's tokenizer)
        c.name = "lm_draft"
        c.data.tokenizer_path = "runs/lm/tokenizer.json"
        c.model.dim, c.model.depth, c.model.num_heads, c.model.num_kv_heads = 64, 2, 2, 1
    elif preset == "smoke":  # a few seconds: the entry test
        c.name = "lm_smoke"
        c.data.corpus = "sklearn"
        c.data.tokenizer = "byte"
        c.data.row_length = 32
        c.model.dim, c.model.depth, c.model.num_heads, c.model.num_kv_heads = 32, 1, 2, 1
        c.train.num_steps, c.train.batch_size, c.train.warmup_steps = 4, 4, 1
        c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 2
        c.train.progress = False
        c.sample.num_prompts, c.sample.prompt_chars, c.sample.max_new_tokens = 2, 8, 6
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    check_choice(c, "data.corpus", CORPORA)
    check_choice(c, "data.tokenizer", TOKENIZERS)
    check_choice(c, "data.rows", ROW_MODES)
    check_choice(c, "model.attention", ATTENTIONS)
    check_choice(c, "model.attn_impl", IMPLS)
    check_choice(c, "resume", ["auto", "force", "never"])
    check(0 < c.data.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {c.data.val_fraction}")
    check_positive(c, "data.bpe_vocab", "data.row_length", "model.dim", "model.depth", "model.num_heads",
                   "model.num_kv_heads", "model.rope_theta", "train.num_steps", "train.batch_size",
                   "train.learning_rate", "train.log_every", "train.eval_every", "train.checkpoint_every",
                   "train.keep_checkpoints", "sample.prompt_chars", "sample.max_new_tokens")
    check_positive(c, "model.mlp_hidden", "train.stop_at_step", "train.warmup_steps", "train.weight_decay",
                   "train.clip_norm", "sample.num_prompts", "sample.temperature", "sample.top_k", allow_zero=True)
    check(c.data.row_length >= 4, f"data.row_length must be >= 4, got {c.data.row_length}")
    check(c.data.tokenizer != "bpe" or c.data.bpe_vocab >= 258,
          f"data.bpe_vocab must be >= 258 (the byte alphabet + 2 specials), got {c.data.bpe_vocab}")
    check(c.model.attention != "linear" or c.data.rows == "single",
          "model.attention='linear' needs data.rows='single' (its state cannot reset inside a packed row)")
    check(c.train.stop_at_step <= c.train.num_steps,
          f"train.stop_at_step ({c.train.stop_at_step}) must be <= train.num_steps ({c.train.num_steps})")
    check(0 < c.sample.top_p <= 1, f"sample.top_p must be in (0, 1], got {c.sample.top_p}")
