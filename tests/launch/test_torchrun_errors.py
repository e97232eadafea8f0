"""Under torchrun, qshard's own errors (QShardError) come out once: rank 0 prints one
`error: <message>` line and exits 2, the other ranks exit without a word, and no rank prints a
traceback. (torchrun's agent then reports the failed ranks with a traceback of its own, which
is torchrun's output, not a rank's: each rank's output is read from torchrun's --log-dir.)"""

from __future__ import annotations

import subprocess

import pytest

from tests.launch.conftest import REPO, child_env
from tests.launch.test_torchrun import TORCHRUN


def rank_outputs(log_dir) -> dict[int, str]:
    """Each rank's stdout + stderr, from torchrun's --log-dir layout (<run>/attempt_0/<rank>/)."""
    out: dict[int, str] = {}
    for f in sorted(log_dir.rglob("*.log")):
        if f.parent.name.isdigit():
            out[int(f.parent.name)] = out.get(int(f.parent.name), "") + f.read_text()
    return out


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("nproc,args,message", [
    (3, ["--prompt", ""], "error: prompt 0 is empty"),
    (3, ["--prompt", "x", "--max-tokens", "0"], "error: SamplingParams.max_tokens must be an integer >= 1, got 0"),
    (2, ["--prompt", "x"], "error: tensor-parallel size 2 does not divide num_attention_heads = 9"),
], ids=["empty-prompt", "max-tokens-0", "tp-not-dividing-heads"])
def test_a_qshard_error_is_printed_once_by_rank0(model_dir, tmp_path, nproc, args, message):
    log_dir = tmp_path / "logs"
    cmd = TORCHRUN + ["--nproc-per-node", str(nproc), "--log-dir", str(log_dir), "--redirects", "3",
                      "-m", "launch.torchrun", "--log-level", "WARNING", "generate", "--model", str(model_dir),
                      *args]
    proc = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    outputs = rank_outputs(log_dir)
    assert sorted(outputs) == list(range(nproc)), (sorted(outputs), proc.stderr[-2000:])
    error_lines = [(r, ln) for r, text in outputs.items() for ln in text.splitlines() if ln.startswith("error:")]
    print(f"\n{error_lines}")
    assert len(error_lines) == 1 and error_lines[0][0] == 0, outputs
    assert error_lines[0][1].startswith(message), error_lines
    assert not any("Traceback" in text for text in outputs.values()), outputs
    assert proc.returncode != 0
    assert "exitcode  : 2" in proc.stderr  # rank 0's exit code, in torchrun's report
