"""The README's Use section, run as written.

The section's shell code blocks are parsed out of README.md and every command runs verbatim, in
order, in one bash (as a reader pastes them: later commands use the `DIR` an earlier one set), in a
copy of the checkout (tracked and unignored files, `.venv` linked in, as after `make install`) with a
fresh HOME (no `~/.ray` token of the user's) and this suite's QSHARD_CACHE (the converted default
model). The Python block is saved under the name its first line gives and run by the README's own
command. Ray's daemons and the `ray job submit` recipe run in new PID and network namespaces where
`unshare` allows it: the README's `ray stop` then stops only the cluster the README started, the
default ports are private, and whatever is left dies with the namespace. Without namespaces the test
runs only when no other Ray runs here, and kills what the README's cluster left by pid afterwards.
Each command must exit 0 and print (or write) what it is for.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launch.conftest import REPO, _cluster_pids, stop_cluster

README = REPO / "README.md"
COMMAND_MARK = "@@readme-command"
EXIT_MARK = "@@readme-exit"
SCRIPT_TIMEOUT_S = 900  # 2 min on a quiet 2-core machine (quantize: 34 s); 3.5+ min when it is busy
pytestmark = [pytest.mark.slow, pytest.mark.timeout(SCRIPT_TIMEOUT_S + 120)]  # whichever test runs the fixture
# What a reader's shell would not have: the suite's own settings (loopback Ray without auth, the
# Triton interpreter, the checkout on PYTHONPATH) must not help the README's commands.
SUITE_ONLY_ENV = ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET", "QSHARD_DEBUG")


# -- the README -----------------------------------------------------------------------------------


@dataclass
class UseSection:
    commands: list[str]        # shell commands, verbatim (a continued line keeps its backslash)
    scripts: dict[str, str]    # file name (the block's first line, "# NAME") -> Python source


def use_section(markdown: str) -> str:
    match = re.search(r"^## Use\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match, "README.md has no '## Use' section"
    return match.group(1)


def code_blocks(section: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", section, re.M | re.S)


def shell_commands(block: str) -> list[str]:
    commands, pending = [], []
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending.append(line)
        if not line.endswith("\\"):
            commands.append("\n".join(pending))
            pending = []
    assert not pending, f"a command ends in a backslash: {pending}"
    return commands


def parse_use(markdown: str) -> UseSection:
    commands, scripts = [], {}
    for lang, body in code_blocks(use_section(markdown)):
        if lang == "python":
            first = body.splitlines()[0]
            assert re.fullmatch(r"# [\w.-]+\.py", first), f"a Python block must start with '# NAME.py': {first!r}"
            scripts[first[2:]] = body
        else:
            assert lang in ("sh", "bash", ""), f"unexpected code block language {lang!r} in the Use section"
            commands += shell_commands(body)
    return UseSection(commands, scripts)


def words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def is_cmd(command: str, *prefix: str) -> bool:
    return words(command)[:len(prefix)] == list(prefix)


def option(command: str, name: str) -> str:
    w = words(command)
    return w[w.index(name) + 1]


# -- running it -----------------------------------------------------------------------------------


def bash_script(commands: list[str], stop_command: str | None) -> str:
    """The commands as they are, each between markers that carry its index and exit status; the
    first failure ends the script. The README's `ray stop` also runs on any exit once the cluster
    start was reached."""
    lines = []
    for i, command in enumerate(commands):
        if stop_command and is_cmd(command, "ray", "start"):
            lines.append(f"trap {shlex.quote(stop_command)} EXIT")
        lines += [f"printf '\\n{COMMAND_MARK} {i} %s\\n' \"$(date +%s.%N)\"", command,
                  f"__rc=$?; printf '\\n{EXIT_MARK} {i} %d %s\\n' $__rc \"$(date +%s.%N)\"; "
                  f"[ $__rc = 0 ] || exit $__rc"]
    return "\n".join(lines) + "\n"


@dataclass
class Result:
    output: str
    status: int | None   # None: the script ended (or timed out) inside this command
    seconds: float | None


def split_output(output: str) -> dict[int, Result]:
    results = {}
    parts = re.split(rf"^{COMMAND_MARK} (\d+) ([\d.]+)$", output, flags=re.M)
    for index, started, chunk in zip(parts[1::3], parts[2::3], parts[3::3]):
        end = re.search(rf"^{EXIT_MARK} {index} (\d+) ([\d.]+)$", chunk, re.M)
        results[int(index)] = (Result(chunk[:end.start()], int(end.group(1)), float(end.group(2)) - float(started))
                               if end else Result(chunk, None, None))
    return results


def namespace_prefix() -> list[str] | None:
    """`unshare` into new PID and network namespaces (loopback up), or None where it is not allowed."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not unshare or not ip:
        return None
    prefix = [unshare, "--pid", "--fork", "--kill-child", "--mount-proc", "--net"]
    probe = subprocess.run([*prefix, ip, "link", "set", "lo", "up"], capture_output=True, timeout=30)
    return prefix if probe.returncode == 0 else None


def ray_running_here() -> bool:
    import psutil

    for p in psutil.process_iter(["name"]):
        if p.info["name"] in ("raylet", "gcs_server"):
            return True
    return False


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def copy_checkout(dest: Path) -> None:
    """The checkout's tracked and unignored files (what a clone holds, with work in progress), and
    its venv linked in."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(REPO / ".venv")


def remove_new_entries(directory: str, before: set[str]) -> None:
    """The session folders (and the session_latest link) this run's cluster made in its temp dir."""
    if not os.path.isdir(directory):
        return
    for entry in set(os.listdir(directory)) - before:
        path = os.path.join(directory, entry)
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def run_script(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> str:
    """Run to the end or SCRIPT_TIMEOUT_S, output (stdout and stderr) into a file: a daemon the
    script leaves cannot hold a pipe open. On timeout the script's process group is killed."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=SCRIPT_TIMEOUT_S)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
    output = log.read_text(errors="replace")
    return output + (f"\n(the Use section did not finish within {SCRIPT_TIMEOUT_S}s)" if timed_out else "")


@dataclass
class Run:
    use: UseSection
    cwd: Path
    home: Path
    output: str
    results: dict[int, Result]

    def path(self, word: str) -> Path:
        """A path word of a command, with the shell's $PWD and ~ expanded."""
        word = word.replace("${PWD}", str(self.cwd)).replace("$PWD", str(self.cwd))
        if word.startswith("~/"):
            word = str(self.home) + word[1:]
        return Path(word) if os.path.isabs(word) else self.cwd / word


@pytest.fixture(scope="module")
def readme_run(model_dir):
    from engine.default_model import cache_dir

    use = parse_use(README.read_text())
    if not (REPO / ".venv" / "bin" / "activate").exists():
        pytest.skip("no .venv in the checkout (the README's commands need `make install` first)")
    starts = [c for c in use.commands if is_cmd(c, "ray", "start")]
    stops = [c for c in use.commands if is_cmd(c, "ray", "stop")]
    assert len(starts) == 1 and len(stops) == 1, "the Use section starts and stops one Ray cluster"
    temp_dir = option(starts[0], "--temp-dir")
    prefix = namespace_prefix()
    if prefix is None and (ray_running_here() or port_busy(6379) or port_busy(8265)):
        pytest.skip("no PID/network namespaces here and another Ray runs: the README's `ray stop` would stop it too")

    root = Path(tempfile.mkdtemp(prefix="qshard-readme-"))
    cwd, home = root / "qshard", root / "home"
    cwd.mkdir()
    home.mkdir()
    copy_checkout(cwd)
    for name, source in use.scripts.items():
        (cwd / name).write_text(source)
    script = root / "use-section.sh"
    script.write_text(bash_script(use.commands, stops[0]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in SUITE_ONLY_ENV}
    env.update(HOME=str(home), QSHARD_CACHE=str(cache_dir()), PYTHONUNBUFFERED="1")
    before = set(os.listdir(temp_dir)) if os.path.isdir(temp_dir) else set()
    argv = ["bash", str(script)]
    if prefix is not None:
        argv = [*prefix, "bash", "-c", 'ip link set lo up && exec bash "$0"', str(script)]
    try:
        output = run_script(argv, cwd, env, root / "use-section.log")
    finally:
        if prefix is None:
            stop_cluster(temp_dir)
        left = _cluster_pids(temp_dir) if prefix is None else []
        remove_new_entries(temp_dir, before)
    try:
        yield Run(use, cwd, home, output, split_output(output))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"Ray processes left behind by the README's cluster: {left}"


def result_of(run: Run, i: int) -> str:
    command = run.use.commands[i]
    assert i in run.results, f"not reached: {command!r}\n--- output tail:\n{run.output[-4000:]}"
    result = run.results[i]
    assert result.status == 0, f"{command!r} exited {result.status}:\n{result.output[-4000:]}"
    return result.output


def commands_where(run: Run, predicate) -> list[int]:
    found = [i for i, c in enumerate(run.use.commands) if predicate(c)]
    assert found, "the Use section lacks a command this test checks"
    return found


# -- the checks -------------------------------------------------------------------------------------


def test_every_use_command_exits_0(readme_run):
    for i, command in enumerate(readme_run.use.commands):  # shown with -s: what each command cost
        seconds = readme_run.results.get(i, Result("", None, None)).seconds
        print(f"{seconds if seconds is not None else float('nan'):7.1f} s  {command.splitlines()[0][:100]}")
    for i in range(len(readme_run.use.commands)):
        result_of(readme_run, i)


def generates(run: Run, command: str) -> bool:
    w = words(command)
    return ("generate" in w and w[0] in ("qshard", "torchrun")) or (w[0] == "python" and w[1] in run.use.scripts)


def on_quantized_model(run: Run, command: str) -> bool:
    """Whether the command's --model is what a `qshard quantize` of the section wrote."""
    made = {option(c, "-o") for c in run.use.commands if is_cmd(c, "qshard", "quantize")}
    return "--model" in words(command) and option(command, "--model") in made


def generated(run: Run, i: int) -> str:
    """The output of generate command i, after checking its summary line where it has one: the TP
    size and executor asked for, 1 to --max-tokens tokens per prompt."""
    text, command = result_of(run, i), run.use.commands[i]
    if is_cmd(command, "python"):
        return text
    summary = re.search(r"^tp=(\d+) executor=(\w+) dtype=\S+ tokens=(\d+) ", text, re.M)
    assert summary, text[-2000:]
    tp, executor, tokens = int(summary.group(1)), summary.group(2), int(summary.group(3))
    if is_cmd(command, "torchrun"):
        assert (tp, executor) == (int(option(command, "--nproc-per-node")), "external")
    else:
        assert (tp, executor) == (int(option(command, "--tp")), option(command, "--executor"))
    prompts = [w for k, w in zip(words(command), words(command)[1:]) if k == "--prompt"]
    assert all(f"### prompt: {prompt}" in text for prompt in prompts), text[-2000:]
    assert len(prompts) <= tokens <= len(prompts) * int(option(command, "--max-tokens"))
    return text


def test_float_model_commands_answer_paris(readme_run):
    """qshard (mp, ray), torchrun and the Python script on the default model: greedy, so the
    answer about France's capital is Paris."""
    for i in commands_where(readme_run, lambda c: generates(readme_run, c) and not on_quantized_model(readme_run, c)):
        assert "Paris" in generated(readme_run, i), readme_run.use.commands[i]


def test_quantized_model_generates(readme_run):
    """The 4-bit copy (a small calibration: its answer may differ from the float model's)."""
    for i in commands_where(readme_run, lambda c: generates(readme_run, c) and on_quantized_model(readme_run, c)):
        generated(readme_run, i)


def test_quantize_writes_a_gptq_checkpoint(readme_run):
    for i in commands_where(readme_run, lambda c: is_cmd(c, "qshard", "quantize")):
        result_of(readme_run, i)
        out = readme_run.path(option(readme_run.use.commands[i], "-o"))
        config = json.loads((out / "config.json").read_text())
        qc = config["quantization_config"]
        assert qc["quant_method"] == option(readme_run.use.commands[i], "--method")
        assert qc["bits"] == int(option(readme_run.use.commands[i], "--bits"))
        assert qc["group_size"] == int(option(readme_run.use.commands[i], "--group-size"))
        assert list(out.glob("*.safetensors"))


def test_eval_ppl_scores_every_model(readme_run):
    for i in commands_where(readme_run, lambda c: is_cmd(c, "qshard", "eval-ppl")):
        text = result_of(readme_run, i)
        models = [w for k, w in zip(words(readme_run.use.commands[i]), words(readme_run.use.commands[i])[1:])
                  if k == "--model"]
        ppl = [float(x) for x in re.findall(r": ppl (\d+\.\d+) ", text)]
        assert len(ppl) == len(models), text[-2000:]
        assert all(math.isfinite(p) and 1 < p < 1000 for p in ppl), ppl
        if len(ppl) == 2:  # the float model, then its 4-bit copy: rounding costs some perplexity
            assert ppl[0] < ppl[1], ppl


def test_ray_job_submit_writes_its_result(readme_run):
    run = readme_run
    (start,) = commands_where(run, lambda c: is_cmd(c, "ray", "start"))
    assert "Ray runtime started" in result_of(run, start)
    for i in commands_where(run, lambda c: is_cmd(c, "ray", "job", "submit")):
        command = run.use.commands[i]
        assert re.search(r"Job '[^']+' succeeded", result_of(run, i))
        result = json.loads(run.path(option(command, "--out")).read_text())
        prompts = run.path(option(command, "--prompts")).read_text().splitlines()
        assert result["ok"] is True and result["executor"] == "ray"
        assert result["tp"] == int(option(command, "--tp")) == len(result["ranks"])
        assert len({r["pid"] for r in result["ranks"]}) == result["tp"]
        assert [o["prompt"] for o in result["outputs"]] == prompts
        assert all(0 < len(o["token_ids"]) <= int(option(command, "--max-tokens")) for o in result["outputs"])
        assert "Paris" in result["outputs"][0]["text"]
    (stop,) = commands_where(run, lambda c: is_cmd(c, "ray", "stop"))
    assert "Stopped" in result_of(run, stop)
