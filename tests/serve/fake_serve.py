"""`dvlm serve` exactly as a user starts it, with only the engine replaced by the fake one.

    python -m tests.serve.fake_serve serve --port 0 ...     (from the repository root)

Runs `dvlm.cli.main`: the same settings checks, socket, model load, URL line, uvicorn server and
signal handling as the real command. A request with max_tokens=HANG_TOKENS hangs (only a cancel, a
timeout or the shutdown ends it), so that requests can be in flight when the process is signalled.
"""

from __future__ import annotations

import importlib.util
import sys
import types

from dvlm.cli import main
from dvlm.serve import server
from dvlm.serve.app import create_app
from dvlm.serve.metrics import ServeMetrics
from dvlm.serve.settings import ServedModel
from tests.serve.fake_engine import FakeEngine

HANG_TOKENS = 333


def build_app(lm, name, settings):
    metrics = ServeMetrics()
    engine = FakeEngine(lambda text: lm.processor.tokenizer(text, add_special_tokens=False)["input_ids"],
                        lm.processor.decode, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                        observer=metrics)
    engine.hang_if = lambda request: request.max_new_tokens == HANG_TOKENS
    return create_app(engine, ServedModel.from_lm(lm, name), settings, metrics)


if __name__ == "__main__":
    server.build_app = build_app
    if importlib.util.find_spec("dvlm.serve.engine") is None:  # before h-engine is merged
        sys.modules["dvlm.serve.engine"] = types.ModuleType("dvlm.serve.engine")
    sys.exit(main(sys.argv[1:]))
