"""Multi-host runs never hang: two CPU processes under ``jax.distributed``, one of them failing.

The processes talk through the coordination service of ``jax.distributed.initialize`` (no device collectives
are needed for the exchange), so the two processes of each test start in a few seconds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from convert.speech import speech_clip
from xcodec2_jax import multihost

REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_WITHIN_S = 60
HARD_TIMEOUT_S = 600  # a hang fails the test instead of the CI job

START = """
import sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, rank = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
"""

TOKENIZE_AND_FAIL = START + textwrap.dedent(
    """
    corpus, checkpoint, out, device_step = sys.argv[3:]
    import numpy as np
    from xcodec2_jax import engine
    from xcodec2_jax.tokenize import store, tokenize_corpus
    if device_step == "stand-in":  # codes of the right shape, no compilation: the failure handling is tested
        import jax.numpy as jnp
        engine.Engine.compiled = lambda self, direction, frames: (
            lambda state, waveform, *rest: jnp.zeros((waveform.shape[0], frames), jnp.int32))
    if rank == 1:  # disk full, a bug, ...: process 1 raises at its first row
        def fail(self, row):
            print(f"FAILING AT {time.time()}", flush=True)
            raise RuntimeError("injected failure writing a row")
        store.ShardWriter.add = fail
    tokenize_corpus(corpus, out, model=checkpoint, batch_size=1, buckets=(1.6,), progress=False)
    print("FINISHED", flush=True)
    """
)

EXCHANGES = START + textwrap.dedent(
    """
    import numpy as np
    from xcodec2_jax import multihost
    assert multihost.allgather(np.array([rank, 7], np.int32)).tolist() == [[0, 7], [1, 7]]
    if rank == 1 and sys.argv[3] == "exit":
        raise ValueError("a bug in the script, outside any fail_together block")
    with multihost.fail_together():
        if rank == 1:
            time.sleep(8)  # hung (a stuck file system read, say): process 0 gives up after the timeout
        multihost.barrier()
    print("FINISHED", flush=True)
    """
)


def _run_two(script: str, *args, **env: str) -> tuple[list[str], list[int], list[float]]:
    """Run ``script`` as processes 0 and 1; -> (outputs, exit codes, exit times)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), **env}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(port), str(rank), *map(str, args)], env=environment,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    ended: list[float | None] = [None, None]
    deadline = time.monotonic() + HARD_TIMEOUT_S
    while None in ended and time.monotonic() < deadline:
        for rank, proc in enumerate(procs):
            if ended[rank] is None and proc.poll() is not None:
                ended[rank] = time.time()
        time.sleep(0.05)
    for proc in procs:
        proc.kill()
    outputs = [proc.communicate()[0] for proc in procs]
    assert None not in ended, f"a process hung for {HARD_TIMEOUT_S} s:\n" + "\n".join(outputs)
    return outputs, [proc.returncode for proc in procs], ended


@pytest.mark.parametrize("device_step", ["stand-in", pytest.param("real", marks=pytest.mark.slow)])
def test_a_process_raising_mid_run_stops_both(reference, tmp_path, device_step):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        sf.write(corpus / f"utt{i}.flac", speech_clip(0.6 + 0.1 * i, seed=i), 16000)
    outputs, codes, ended = _run_two(TOKENIZE_AND_FAIL, corpus, reference.checkpoint, tmp_path / "out", device_step)
    assert codes[0] != 0 and codes[1] != 0, outputs
    failed_at = float(outputs[1].split("FAILING AT ")[1].split()[0])
    print(f"both stopped {max(ended) - failed_at:.1f} s after process 1 failed")
    assert max(ended) - failed_at < STOP_WITHIN_S, outputs
    assert "FINISHED" not in outputs[0] + outputs[1]
    assert "RuntimeError: injected failure writing a row" in outputs[1]
    assert "PeerFailedError: process 1 of 2 failed: RuntimeError: injected failure writing a row" in outputs[0]


def test_a_process_exiting_on_an_uncaught_error_stops_the_other():
    outputs, codes, _ = _run_two(EXCHANGES, "exit")
    assert codes == [1, 1], outputs
    assert ("PeerFailedError: process 1 of 2 failed: exited (ValueError: a bug in the script, outside any "
            "fail_together block)") in outputs[0]


def test_a_silent_peer_times_out_and_the_timeout_stops_it():
    outputs, codes, _ = _run_two(EXCHANGES, "timeout", **{multihost.TIMEOUT_ENV: "2"})
    assert codes == [1, 1], outputs
    assert "PeerTimeoutError: process(es) [1] of 2 did not reach exchange #1 within 2 s" in outputs[0]
    # Process 1 wakes up to process 0's published timeout instead of waiting for a peer that is gone.
    assert "PeerFailedError: process 0 of 2 failed: PeerTimeoutError" in outputs[1]


def test_one_process_needs_no_exchange():
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(multihost.allgather(value), value[None])
    with pytest.raises(ZeroDivisionError), multihost.fail_together():  # nothing to tell: re-raised as is
        _ = 1 / 0
