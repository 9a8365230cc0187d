"""The lm-evaluation-harness model ``megadeep``: ``lm_eval``'s tasks on a megadeep checkpoint.

lm-eval finds models in its own registry only, so this module registers ``megadeep`` when imported:
in Python ``import megadeep.inference.harness`` before ``lm_eval.simple_evaluate(model="megadeep",
model_args="checkpoint=DIR")``; on the command line ``python -m megadeep.inference.harness`` takes
``lm_eval``'s own arguments (``--model megadeep --model_args checkpoint=DIR --tasks ...``).

Scoring is lm-eval's ``TemplateLM`` (the context/continuation split its HF model uses) over our
model's full-vocabulary logits (``generate.forward``), with the same left truncation to the context;
``generate_until`` is :func:`megadeep.inference.generate.generate`, greedy, cut at the stop strings.
lm-eval is an optional dependency: this module is the only one that imports it. Started by torchrun
(``torchrun --nproc_per_node N -m megadeep.inference.harness ...``) the model runs at TP=N: every rank
scores every request on its shard (lm-eval sees one process) and rank 0 reports.
"""
from __future__ import annotations

import lm_eval.models  # noqa: F401  lm-eval's own models: its registry skips them once it is not empty
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from megadeep.inference.cli import start_rank
from megadeep.inference.generate import Sampling, forward, generate
from megadeep.inference.load import load_model
from megadeep.inference.text import codec_for
from megadeep.launch.env import world_size_from_env
from megadeep.parallel import groups
from megadeep.parallel.layout import Layout


@register_model("megadeep")
class MegadeepLM(TemplateLM):
    def __init__(self, checkpoint: str, tokenizer: str | None = None, batch_size: int | str = 8,
                 max_gen_toks: int = 256, device: str | None = None, **kwargs):
        super().__init__()
        if world_size_from_env():  # a torchrun rank: TP over all of them
            device = start_rank()
            groups.initialize(Layout(tp=dist.get_world_size()))
        elif not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm_eval's CLI asks for cuda by default
        self.model, ckpt = load_model(checkpoint, device)
        self.codec = codec_for(ckpt.meta["config"], tokenizer)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length, self.max_gen_toks = self.model.cfg.max_seq_len, int(max_gen_toks)
        self._device = torch.device(device)

    @property
    def eot_token_id(self) -> int:
        return self.codec.eos_id if self.codec.eos_id is not None else 0  # bytes: NUL ends a text

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.codec.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.codec.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """(Σ log p(continuation | context), whether greedy decoding gives the continuation) per request."""
        out = []
        size = override_bs or self.batch_size
        for start in range(0, len(requests), size):
            chunk = requests[start:start + size]
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            width = max(map(len, rows))
            tokens = torch.zeros((len(rows), width), dtype=torch.long, device=self._device)
            for i, row in enumerate(rows):  # right padding: causal attention never reads it
                tokens[i, :len(row)] = torch.tensor(row)
            positions = torch.arange(width, device=self._device).expand(len(rows), width)
            logp = F.log_softmax(forward(self.model, tokens, positions, torch.ones_like(tokens, dtype=torch.bool)), -1)
            for i, ((_, _, cont), row) in enumerate(zip(chunk, rows)):
                scores = logp[i, len(row) - len(cont):len(row)]
                target = torch.tensor(cont, device=self._device)
                ll = scores.gather(-1, target[:, None]).sum().item()
                out.append((ll, bool((scores.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p of each whole text, in disjoint windows of the context length (as lm-eval's HF model)."""
        out = []
        for (text,) in (r.args for r in requests):
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            out.append(sum(ll for ll, _ in self._loglikelihood_tokens([(None, *w) for w in windows])))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, kwargs in (r.args for r in requests):
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-(self.max_length - n):]
            new = generate(self.model, [ids], Sampling(max_new_tokens=n, eos_id=self.codec.eos_id)).tokens[0]
            text = self.tok_decode(new)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


if __name__ == "__main__":  # lm_eval's command line, with ``megadeep`` registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
