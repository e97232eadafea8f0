"""`qshard write-random`: a real, sharded safetensors checkpoint that loads like the in-place dummy model."""

from __future__ import annotations

import json

from engine import LLM, SamplingParams
from launch.cli import main


def test_written_checkpoint_splits_into_files_and_generates_what_the_dummy_model_does(tmp_path):
    out = tmp_path / "tiny-gptq"
    assert main(["--log-level", "WARNING", "write-random", "--shape", "tiny", "--quant", "gptq-w4g128",
                 "--dtype", "float32", "--shard-gb", "0.0002", "-o", str(out)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and "qshard_dummy" not in config

    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with LLM(out, executor="uni", dtype="float32", progress=False) as llm:
        written = llm.generate([[1, 2, 3]], params)[0].token_ids
    with LLM(out, executor="uni", dtype="float32", progress=False, load_format="dummy") as llm:
        made = llm.generate([[1, 2, 3]], params)[0].token_ids
    assert len(written) == 4 and written == made
