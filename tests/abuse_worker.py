"""Runs abuse cases for test_abuse.py in a process of its own, so that a crash (a signal) or a hang
shows up as a failed case instead of killing pytest. Protocol: one JSON object per line on stdin
({"code": ...}), one per line on stdout ({"exc": [class names of the exception's MRO] or null,
"msg": ...}). The namespace every case runs in is built once from the paths in argv[1] (JSON)."""

import json
import math
import sys
import traceback

import numpy as np

import tokenmill
from tokenmill import _core, _testing  # noqa: F401  (cases use them)
from tokenmill.engine.default_model import install_from  # noqa: F401


def namespace(paths: dict) -> dict:
    m = tokenmill.load(paths["default"], n_threads=1)
    tiny = tokenmill.load(paths["tiny_gguf"], n_threads=1)
    nat = tiny.native
    return dict(tokenmill=tokenmill, _core=_core, _testing=_testing, np=np, math=math, P=paths, m=m, tiny=tiny,
                nat=nat, E=nat.hparams.n_embd, V=nat.hparams.n_vocab, install_from=install_from)


def tiny_hparams():
    """The hyper-parameters of the tests' tiny llama (a fresh object per case: cases change it)."""
    hp = _core.HParams()
    hp.arch, hp.n_vocab, hp.n_embd, hp.n_layer, hp.n_head, hp.n_head_kv = "llama", 320, 64, 3, 4, 2
    hp.head_dim, hp.n_ff, hp.n_ctx_train = 16, 160, 256
    return hp


def main() -> None:
    base = namespace(json.loads(sys.argv[1]))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        ns = dict(base, hp=tiny_hparams())
        reply = {"exc": None, "msg": ""}
        try:
            exec(case["code"], ns)
        except BaseException as exc:  # noqa: BLE001 -- every outcome is reported to the test
            reply = {"exc": [c.__name__ for c in type(exc).__mro__], "msg": str(exc)[:500],
                     "tb": traceback.format_exc()[-1500:]}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
