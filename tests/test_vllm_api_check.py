"""benchmarks/check_vllm_api.py's AST logic on a small fake vLLM tree (no download, no vllm import):
names resolved through a lazy MODULE_ATTRS table, re-exports and mixins in other modules, **kwargs
forwarded to EngineArgs fields, msgspec-style fields, Literal values; a wrong keyword is flagged."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_VLLM = {
    "vllm/__init__.py": '''
MODULE_ATTRS = {
    "LLM": ".entrypoints.llm:LLM",
    "SamplingParams": ".sampling_params:SamplingParams",
    "EngineArgs": ".engine.arg_utils:EngineArgs",
    "RequestOutput": ".outputs:RequestOutput",
    "CompletionOutput": ".outputs:CompletionOutput",
}
def __getattr__(name):
    raise AttributeError(name)
''',
    "vllm/version.py": "__version__ = '9.9.9'\n",
    "vllm/entrypoints/__init__.py": "",
    "vllm/entrypoints/pooling/__init__.py": "",
    "vllm/entrypoints/pooling/offline.py": '''
class PoolingOfflineMixin:
    def score(self, data_1, data_2, /, *, use_tqdm=True, truncate_prompt_tokens=None):
        ...
''',
    "vllm/entrypoints/llm.py": '''
from vllm.entrypoints.pooling.offline import PoolingOfflineMixin
class LLM(PoolingOfflineMixin):
    def __init__(self, model: str, *, dtype: str = "auto", seed: int = 0, **kwargs):
        self.engine = None
    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        ...
    def get_tokenizer(self):
        ...
''',
    "vllm/config/__init__.py": "from vllm.config.model import LogprobsMode, RunnerOption\n",
    "vllm/config/model.py": '''
from typing import Literal
RunnerType = Literal["generate", "pooling"]
RunnerOption = Literal["auto", RunnerType]
LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]
''',
    "vllm/engine/__init__.py": "",
    "vllm/engine/arg_utils.py": '''
from dataclasses import dataclass
from vllm.config import LogprobsMode, RunnerOption
@dataclass
class EngineArgs:
    model: str = "m"
    max_logprobs: int = 20
    logprobs_mode: LogprobsMode = "raw_logprobs"
    runner: RunnerOption = "auto"
''',
    "vllm/sampling_params.py": '''
import msgspec
class SamplingParams(msgspec.Struct, omit_defaults=True):
    max_tokens: int = 16
    temperature: float = 1.0
    logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
''',
    "vllm/outputs.py": '''
class CompletionOutput:
    def __init__(self, logprobs):
        self.logprobs = logprobs
class RequestOutput:
    outputs: list
''',
}

OURS = '''
import vllm

class Backend:
    def __init__(self, cfg):
        args = dict(cfg.args)
        args.setdefault("max_logprobs", 20)
        args.setdefault("logprobs_mode", "processed_logprobs")
        self.llm = vllm.LLM(model="m", dtype="bfloat16", **args)
        self.params = vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=20, allowed_token_ids=[1])

    def run(self, prompts):
        self.llm.get_tokenizer()
        outs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [self.llm.score(q, docs, use_tqdm=False) for q, docs in prompts], outs
'''

ATTRS = [("vllm", "RequestOutput", "outputs", "x"), ("vllm", "CompletionOutput", "logprobs", "x")]
VALUES = [("vllm", "EngineArgs", "logprobs_mode", "processed_logprobs", "x"),
          ("vllm", "EngineArgs", "runner", "pooling", "x")]


def _checker():
    spec = importlib.util.spec_from_file_location("check_vllm_api", ROOT / "benchmarks" / "check_vllm_api.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_vllm_api"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _run(ours: str, attrs=ATTRS, values=VALUES):
    c = _checker()
    tree = c.SourceTree(dict(FAKE_VLLM))
    return c, tree, c.run_checks({"vllm": tree}, {"ours.py": ours}, attrs=attrs, values=values)


def test_every_use_of_our_code_is_found_in_the_fake_vllm():
    c, tree, rows = _run(OURS)
    bad = [r for r in rows if r.status != "ok"]
    assert not bad, bad
    uses = {r.use for r in rows}
    # each kind of use was actually checked, not skipped
    for want in ("vllm.LLM(model=)", "vllm.LLM(dtype=)", "vllm.LLM (kwargs)(max_logprobs=)",
                 "vllm.LLM (kwargs)(logprobs_mode=)", "vllm.SamplingParams(allowed_token_ids=)",
                 "vllm.LLM.generate (2 positional)", "vllm.LLM.generate(use_tqdm=)", "vllm.LLM.score(use_tqdm=)",
                 "vllm.LLM.get_tokenizer (0 positional)", "vllm.RequestOutput.outputs", "vllm.CompletionOutput.logprobs",
                 "vllm.EngineArgs.logprobs_mode = 'processed_logprobs'", "vllm.EngineArgs.runner = 'pooling'"):
        assert want in uses, (want, sorted(uses))
    assert tree.version("vllm") == "9.9.9"
    score = next(r for r in rows if r.use == "vllm.LLM.score (2 positional)")
    assert "pooling.offline" in score.detail  # found on the mixin, in another module


def test_a_wrong_keyword_a_missing_method_and_a_bad_value_are_flagged():
    wrong = (OURS.replace("use_tqdm=False)\n        return", "use_tqdmm=False)\n        return")
             .replace('args.setdefault("max_logprobs", 20)', 'args.setdefault("task", "score")')
             .replace("self.llm.get_tokenizer()", "self.llm.get_tokenizer(); self.llm.rerank(prompts)")
             .replace("allowed_token_ids=[1]", "allowed_tokens=[1]"))
    values = VALUES + [("vllm", "EngineArgs", "logprobs_mode", "processed", "x")]
    _, _, rows = _run(wrong, values=values)
    missing = {r.use: r.detail for r in rows if r.status != "ok"}
    assert set(missing) == {"vllm.LLM.generate(use_tqdmm=)", "vllm.LLM (kwargs)(task=)", "vllm.LLM.rerank",
                            "vllm.SamplingParams(allowed_tokens=)", "vllm.EngineArgs.logprobs_mode = 'processed'"}, \
        missing
    assert "EngineArgs fields" in missing["vllm.LLM (kwargs)(task=)"]
    assert "no method 'rerank'" in missing["vllm.LLM.rerank"]


def test_too_many_positional_arguments_and_an_unknown_name_are_flagged():
    src = OURS.replace("self.llm.generate(prompts, self.params,", "self.llm.generate(prompts, self.params, 3,")
    src += "\nX = vllm.NoSuchThing\n"
    _, _, rows = _run(src)
    missing = {r.use for r in rows if r.status != "ok"}
    assert missing == {"vllm.LLM.generate (3 positional)", "vllm.NoSuchThing"}, missing


def test_our_real_code_is_read():
    """The real larcq_ray files yield the uses the README's vLLM paths rest on (no vllm needed)."""
    c = _checker()
    sources = {p: (ROOT / p).read_text() for p in c.OUR_FILES}
    targets = {u.target for u in c.our_uses(sources)}
    assert {"vllm.LLM", "vllm.SamplingParams", "vllm.LLM.generate", "vllm.LLM.score", "vllm.LLM.get_tokenizer",
            "ray.data.llm.vLLMEngineProcessorConfig", "ray.data.llm.build_processor", "vllm.EngineArgs"} <= targets
    assert c.pinned_version() == c.pinned_version(ROOT / "cluster" / "Dockerfile") and c.pinned_version()[0].isdigit()
