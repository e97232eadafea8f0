"""One rank of a model: its shard of the weights, its KV cache, and the forward step.

Every rank runs the same `execute(step)`; collectives inside the model join them. Rank 0 also
samples and returns the next tokens.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

from engine.batch import ForwardBatch
from engine.config import ModelConfig
from engine.cuda_graph import DecodeGraphs
from engine.engine_config import EngineConfig
from engine.kv_cache import KVCache
from engine.load_progress import LoadProgress, Report
from engine.models import model_class
from engine.sampler import Sampler
from engine.step import StepInput, StepOutput
from engine.weights import Weights
from parallel.state import ParallelContext
from quant import get_loader
from quant.base import layouts_dropped

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, ctx: ParallelContext, on_progress: Report | None = None):
        """on_progress(layers read, layers): called as the shard loads (executors watch start-up by it)."""
        self.config, self.ctx = config, ctx
        self.model_config = ModelConfig.from_dir(config.model_path)
        start = time.perf_counter()
        if config.load_format == "dummy":  # random weights of the config's shapes, made in place
            from engine.dummy import DummyWeights

            weights = DummyWeights(self.model_config, dtype=config.dtype, device=ctx.device, seed=config.seed)
        else:
            weights = Weights(config.model_path, dtype=config.dtype, device=ctx.device, rank=ctx.rank,
                              world_size=ctx.world_size)
        loader = get_loader(self.model_config.quantization_config)
        cls = model_class(self.model_config.model_type)
        # layouts_dropped: repacking backends keep one copy of the rank's weights (quant.base)
        with tqdm(total=self.model_config.num_hidden_layers, desc=f"loading rank {ctx.rank}",
                  disable=not config.progress or ctx.rank != 0, unit="layer") as bar, torch.inference_mode(), \
                layouts_dropped():
            progress = LoadProgress(bar, self.model_config.num_hidden_layers, on_progress)
            self.model = cls(self.model_config, weights, loader, ctx, config.dtype, ctx.device, progress=progress,
                             kernels=config.kernels)
        self.model.eval()
        self.weight_bytes_read = weights.bytes_read
        logger.info("rank %d loaded %s (%s) in %.1fs, %.1f MB read", ctx.rank, config.model_path,
                    loader.describe(), time.perf_counter() - start, weights.bytes_read / 2**20)
        self.cache = KVCache(self.model_config.num_hidden_layers, self.model.num_local_kv_heads,
                             self.model_config.head_dim, config.dtype, ctx.device, config.max_model_len)
        self.graphs = None
        if ctx.device.type == "cuda" and config.cuda_graphs:
            # Graphs pin the cache's addresses: allocate it whole (plus one scratch slot for padding).
            self.cache.reserve(config.max_num_seqs + 1, config.max_model_len)
            self.graphs = DecodeGraphs(self.model, self.cache, min(config.max_num_seqs, config.cuda_graph_max_batch),
                                       scratch_slot=config.max_num_seqs, device=ctx.device)
        self.slot_of: dict[int, int] = {}
        self.length_of: dict[int, int] = {}
        self.sampler = Sampler(config.seed) if ctx.rank == 0 else None

    # -- slots ----------------------------------------------------------------------------------

    def _free(self, seq_id: int) -> None:
        """Drop a sequence; the highest slot moves into its place so slots stay [0, n)."""
        slot = self.slot_of.pop(seq_id, None)
        length = self.length_of.pop(seq_id, 0)
        if self.sampler is not None:
            self.sampler.forget(seq_id)
        if slot is None:
            return
        last = len(self.slot_of)
        if slot != last:
            moved = next(s for s, sl in self.slot_of.items() if sl == last)
            self.cache.move(last, slot, self.length_of[moved])
            self.slot_of[moved] = slot

    def _slot(self, seq_id: int) -> int:
        if seq_id not in self.slot_of:
            self.slot_of[seq_id] = len(self.slot_of)
        return self.slot_of[seq_id]

    # -- the step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput | None:
        for seq_id in step.finished:
            self._free(seq_id)
        if not step.seq_ids:
            return StepOutput([]) if self.ctx.rank == 0 else None
        slots = [self._slot(s) for s in step.seq_ids]
        total = [c + len(t) for c, t in zip(step.context_lens, step.token_ids)]
        self.cache.reserve(len(self.slot_of), max(total))
        for seq_id, n in zip(step.seq_ids, total):
            self.length_of[seq_id] = n
        if self._graph_step(step):
            logits = self.graphs.run([t[0] for t in step.token_ids], list(step.context_lens), slots)
            if self.ctx.rank != 0:
                return None
            tokens, logprobs = self.sampler.sample(logits, step.seq_ids, step.sampling, step.penalties)
            return StepOutput(tokens, logprobs)
        batch = ForwardBatch.build(step.token_ids, step.context_lens, slots, self.ctx.device,
                                   all_logits=step.prompt_logprobs)
        hidden = self.model(batch, self.cache)
        logits = self.model.compute_logits(hidden)
        if self.ctx.rank != 0:
            return None
        last = logits[batch.last_logit_row]
        tokens, logprobs = self.sampler.sample(last, step.seq_ids, step.sampling, step.penalties)
        return StepOutput(tokens, logprobs, self._prompt_logprobs(logits, batch, step))

    def _graph_step(self, step: StepInput) -> bool:
        """Decode-only steps that fit a captured graph replay it (the same choice on every rank)."""
        return (self.graphs is not None and self.graphs.can_run(len(step.seq_ids))
                and all(len(t) == 1 for t in step.token_ids) and not any(step.prompt_logprobs))

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, batch: ForwardBatch, step: StepInput):
        if not any(step.prompt_logprobs):
            return None
        # every asking sequence's rows and targets at once: one copy up, one copy down per step
        wanted = [i for i, want in enumerate(step.prompt_logprobs) if want]
        rows = [r for i in wanted for r in range(batch.logit_rows[i].start, batch.logit_rows[i].stop - 1)]
        targets = [t for i in wanted for t in step.token_ids[i][1:]]  # row r predicts the token after it
        index = torch.tensor([rows, targets], dtype=torch.long).to(logits.device)
        flat = logits[index[0]].float().log_softmax(-1).gather(-1, index[1][:, None]).squeeze(-1).tolist()
        out: list[list[float] | None] = [None] * len(step.prompt_logprobs)
        start = 0
        for i in wanted:
            n = len(step.token_ids[i]) - 1
            out[i], start = flat[start:start + n], start + n
        return out
