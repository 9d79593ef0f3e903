"""PostNAS from Qwen2.5-1.5B (the search that produced Jet-Nemotron-2B), for accelerators. Untested at this
scale (developed on CPU at tiny scale); step counts and batch sizes are our choices, the paper's are not
published.

    python -m jetnemo_jax.nas --config configs/postnas_qwen2_5_1_5b.py \\
        --config.teacher.path=/ckpt/Qwen2.5-1.5B --config.data.tokenizer=/ckpt/Qwen2.5-1.5B \\
        --config.data.source=/data/pretrain/*.jsonl --config.eval.mc_jsonl=/data/mmlu_val.jsonl

eval.mc_jsonl: lines {"context": "<question and options> Answer:", "choices": [" A", " B", " C", " D"],
"answer": 2}, e.g. MMLU's validation split rendered this way (answer loss = the paper's MMLU score).
"""

from jetnemo_jax.config import JetBlockConfig
from jetnemo_jax.nas.config import default_config
from jetnemo_jax.train.config import model_section


def get_config():
    c = default_config()
    c.workdir = "runs/postnas_qwen2_5_1_5b"
    c.seeds = (0,)
    c.model = model_section("qwen2_5_1_5b", jet=JetBlockConfig(num_heads=12, head_dim=96, head_v_dim=256),
                            dtype="bfloat16")
    c.teacher.mode = "hf"
    c.teacher.path = ""  # required: the Qwen2.5-1.5B HF directory
    c.data.source = ""  # required: pretraining-like text (.jsonl/.parquet/...)
    c.data.tokenizer = ""  # required: the Qwen2.5 tokenizer directory
    c.data.held_out = 0.001
    c.data.seq_len = 2048
    c.data.text_rows = 24
    c.data.recall = "mqar"
    c.data.recall_rows = 8
    c.data.mqar_pairs = 128
    c.data.recall_vocab = 8192
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 200
    c.supernet.steps = 10_000  # ~0.65B tokens
    c.search.budget = 2
    c.search.beam_width = 4
    c.search.objective = {"mc": 1.0, "retrieval": 1.0}
    c.eval.lm_rows = 64
    c.eval.retrieval_rows = 256
    c.eval.rows_per_call = 4  # 4 x 2048 x 151,936 fp32 logits = 5 GB
    c.fixed.steps = 2_000
    c.blocks.decode_batch = 64
    c.blocks.decode_steps = 128
    c.hardware.state_size = 294_912  # Jet-Nemotron-2B: 12 * 96 * 256 per layer
    c.hardware.heads = (6, 8, 12, 16)
    c.hardware.head_dims = (64, 96, 128, 192)
    c.hardware.value_dims = (128, 192, 256, 384)
    c.hardware.decode_batch = 64
    c.hardware.decode_context = 65_536
    c.hardware.decode_steps = 64
    c.hardware.proxy_metric = "retrieval_accuracy"
    c.handoff.preset = "jet_nemotron_2b"
    c.handoff.overrides = {}
    return c
