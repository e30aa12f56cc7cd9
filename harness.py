"""gptjax as a model of EleutherAI's lm-evaluation-harness (lm_eval): the standard benchmarks computed the standard
way, on any model main.py can load. eval.py is its command line.

    lm = GptjaxLM("124M")                                   # or a model folder: OpenAI's, HF's, a train.py out_dir
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

It implements the harness's three requests as its own HF backend defines them:
  - loglikelihood: log P(continuation | context), and whether the continuation is the greedy one; a context longer than
    the model's n_ctx is cut from the left (the last n_ctx tokens of context + continuation are fed);
  - loglikelihood_rolling: a whole document's log-likelihood over the n_ctx windows of lm_eval's
    get_rolling_token_windows (each token predicted once, with as much context as fits), for perplexity tasks;
  - generate_until: greedy continuations through sampling.py, cut at the first stop string, max_gen_toks tokens.
Requests are sorted by length and scored in batches of batch_size rows padded to a few bucketed lengths (powers of
two and the halfway points between them, up to n_ctx) by one jitted function each way: a task of thousands of requests
compiles a handful of programs. Requests with the same context (a multiple-choice question's choices) in a batch run
it once into a KV cache and their continuations from it; only scored positions are unembedded; the layers run in
the per-layer layout that decoding uses (gpt.unstack_layers). Padding never changes a score: each row's positions
past its length are masked out, and rows are independent.
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

import gpt
import sampling
import weights

MIN_LENGTH = 16


class GptjaxLM(TemplateLM):
    """An lm_eval model over gptjax's params dict (the harness's classes are how it is called, hence a class)."""

    def __init__(self, model="124M", models_dir="models", batch_size=8, dtype=None, max_gen_toks=256, max_length=None):
        super().__init__()
        dtype = jnp.dtype(dtype) if dtype else None
        self.encoder, self.hparams, params = weights.load_encoder_hparams_and_params(model, models_dir, dtype)
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        # the longest window the model is fed (as HF's backend takes it; default and at most n_ctx)
        self._max_length = min(int(max_length or self.hparams["n_ctx"]), self.hparams["n_ctx"])
        # the layout sampling.py runs on: each layer's weights read in place (a stacked layer is copied before each
        # matmul reads it, ~12 ms a pass for 124M on a CPU: 10-25% of a batch of 8)
        self.params = gpt.unstack_layers(params)

    @property
    def eot_token_id(self):
        return self.encoder.eot_token if self.encoder.eot_token is not None else 0

    @property
    def max_length(self):
        return self._max_length

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return list(self.encoder.encode(string))

    def tok_decode(self, ids):
        return self.encoder.decode(ids)

    # ------------------------------------------------------------------------------------------- scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """[(strings, context ids, continuation ids)] -> [(log-likelihood, is greedy)], in the requests' order."""
        pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
        # requests that share a context (a multiple-choice question's choices) compute it once, when it fits whole
        shared = [i for i, (context, continuation) in enumerate(pairs) if len(context) + len(continuation) - 1 <=
                  self.max_length]
        rest = sorted(set(range(len(pairs))) - set(shared))
        results = [None] * len(pairs)
        for i, result in zip(shared, self.score_shared([pairs[i] for i in shared], disable_tqdm)):
            results[i] = result
        for i, result in zip(rest, self.score_rows([fitted(*pairs[i], self.max_length) for i in rest], disable_tqdm)):
            results[i] = result
        for (strings, _, _), result in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """[Instance((document,))] -> [sum of the log-likelihoods of its tokens], over lm_eval's rolling windows."""
        windows, owners = [], []
        for i, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix_token_id, self.max_length, 1)):
                windows.append(fitted(context, continuation, self.max_length))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score_rows(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def score_rows(self, rows, disable_tqdm):
        """[(ids, n_scored)] -> [(sum of the log-probabilities of the last n_scored targets, all of them greedy)],
        longest first, in batches of batch_size padded to bucketed lengths, returned in the rows' order."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out = [None] * len(rows)
        for first in tqdm(range(0, len(order), self.batch_size), desc="scoring", disable=disable_tqdm):
            chosen = order[first:first + self.batch_size]
            length = padded_size(max(len(rows[i][0]) for i in chosen) - 1, self.max_length)
            n_scored = padded_size(max(rows[i][1] for i in chosen), length, smallest=1)
            n_rows = padded_size(len(chosen), self.batch_size, smallest=1)  # a last, short batch is not padded to full
            ids, positions, targets, mask = padded_batch([rows[i] for i in chosen], n_rows, length, n_scored)
            logprobs, greedy = map(np.asarray, target_scores(self.params, ids, positions, targets, mask,
                                                             n_head=self.hparams["n_head"]))
            for row, i in enumerate(chosen):
                out[i] = (float(logprobs[row]), bool(greedy[row]))
        return out

    def score_shared(self, pairs, disable_tqdm):
        """[(context ids, continuation ids)] that fit n_ctx -> [(log-likelihood, is greedy)]: each distinct context's
        prefix (all but its last token) runs once into a KV cache, and every continuation of it runs from that cache
        at its own position, in batches of batch_size continuations over at most batch_size contexts."""
        groups = {}
        for i, (context, _) in enumerate(pairs):
            groups.setdefault(tuple(context), []).append(i)
        out = [None] * len(pairs)
        batches, batch = [], []
        for members in sorted(groups.values(), key=lambda m: -len(pairs[m[0]][0])):  # longest contexts first
            for i in members:
                if len(batch) == self.batch_size:
                    batches.append(batch)
                    batch = []
                batch.append(i)
        batches += [batch] if batch else []
        for batch in tqdm(batches, desc="scoring", disable=disable_tqdm):
            # no context shared within the batch (batch_size 1, say): one pass over whole rows is faster than a
            # prefix pass and a tail pass of one row each (measured at batch 1: 24 against 17 requests/s, 124M)
            alone = len({tuple(pairs[i][0]) for i in batch}) == len(batch)
            inputs = None if alone else shared_batch([pairs[i] for i in batch], self.batch_size, self.max_length)
            if inputs is None:  # contexts near n_ctx, or none shared: scored whole, as the other requests
                scores = self.score_rows([fitted(*pairs[i], self.max_length) for i in batch], True)
            else:
                logprobs, greedy = map(np.asarray, shared_prefix_scores(self.params, *inputs,
                                                                        n_head=self.hparams["n_head"]))
                scores = [(float(logprobs[row]), bool(greedy[row])) for row in range(len(batch))]
            for i, score in zip(batch, scores):
                out[i] = score
        return out

    # ----------------------------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm=False):
        """[Instance((context, {"until": [...], "max_gen_toks": n}))] -> greedy continuations, each cut before its
        first stop string; batched by generation length."""
        outputs = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            context, options = request.args
            until = options.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            n_new = min(int(options.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            ids = self.tok_encode(context)[-(self.max_length - n_new):] or [self.prefix_token_id]
            groups.setdefault(n_new, []).append((i, ids, until))
        for n_new, group in tqdm(groups.items(), desc="generating", disable=disable_tqdm):
            for first in range(0, len(group), self.batch_size):
                batch = group[first:first + self.batch_size]
                chunks = sampling.generate_stream(self.params, self.hparams, [ids for _, ids, _ in batch], n_new,
                                                  greedy=True)
                texts = sampling.joined(sampling.text_stream(chunks, self.tok_decode, [u for _, _, u in batch]))
                for (i, _, _), text in zip(batch, texts):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs


def fitted(context, continuation, n_ctx):
    """(ids fed + the last target, number of continuation tokens scored): the last n_ctx + 1 tokens of context and
    continuation, as the harness's HF backend cuts a context that is too long (from the left)."""
    whole = (list(context) + list(continuation))[-(n_ctx + 1):]
    return whole, len(continuation)


def padded_size(n, n_max, smallest=MIN_LENGTH):
    """The padded size for n: the next of smallest, 1.5 x smallest, 2 x smallest, 3 x smallest, ... (powers of two
    and the halfway points between them: at most a third of a batch is padding), at most n_max."""
    size = smallest
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 and size >= 2 else 1 << size.bit_length()
    return min(size, n_max)


def padded_batch(rows, batch_size, length, n_scored):
    """rows [(ids, n_scored)] -> ids [batch_size, length] and, for the last n_scored positions of each row, their
    positions, targets and whether each is scored, [batch_size, n_scored]. Rows past the last are all padding
    (static shapes: one compiled program per bucket of rows, length and n_scored)."""
    ids = np.zeros((batch_size, length), np.int32)
    positions = np.zeros((batch_size, n_scored), np.int32)
    targets = np.zeros((batch_size, n_scored), np.int32)
    mask = np.zeros((batch_size, n_scored), bool)
    for row, (tokens, scored) in enumerate(rows):
        n = len(tokens) - 1  # inputs: all but the last token; targets: all but the first
        ids[row, :n] = tokens[:-1]
        first = n - n_scored  # may be negative for a short row: those slots are masked out
        positions[row] = np.clip(np.arange(first, n), 0, None)
        targets[row] = np.asarray(tokens, np.int32)[np.clip(np.arange(first, n), 0, None) + 1]
        mask[row] = np.arange(first, n) >= n - scored
    return ids, positions, targets, mask


def shared_batch(pairs, batch_size, n_ctx):
    """[(context, continuation)] -> the arrays of shared_prefix_scores: the distinct contexts' prefixes [G, Lp], each
    row's context index and position (its prefix's length), its tail (the context's last token and the continuation
    but its last) [B, Lk] with its targets (the continuation) and their mask, and the KV cache length (a bucket; at
    least Lp, and every row's position + Lk fits n_ctx). G and B: the contexts and pairs, bucketed, <= batch_size."""
    contexts = list(dict.fromkeys(tuple(context) for context, _ in pairs))
    n_prefix = padded_size(max(len(c) - 1 for c in contexts), n_ctx, smallest=1)
    n_tail = min(-(-max(len(continuation) for _, continuation in pairs) // 4) * 4, n_ctx)  # multiples of 4: tails
    # are short, and their padding is most of what is left to save
    prefixes = np.zeros((padded_size(len(contexts), batch_size, smallest=1), n_prefix), np.int32)  # a few row counts
    for g, context in enumerate(contexts):
        prefixes[g, :len(context) - 1] = context[:-1]
    n_rows = padded_size(len(pairs), batch_size, smallest=1)  # as many rows as pairs, rounded up: short stays short
    group, pos = np.zeros(n_rows, np.int32), np.zeros(n_rows, np.int32)
    tails, targets = np.zeros((n_rows, n_tail), np.int32), np.zeros((n_rows, n_tail), np.int32)
    mask = np.zeros((n_rows, n_tail), bool)
    for row, (context, continuation) in enumerate(pairs):
        group[row], pos[row] = contexts.index(tuple(context)), len(context) - 1
        tail = [context[-1]] + continuation[:-1]
        tails[row, :len(tail)], targets[row, :len(continuation)] = tail, continuation
        mask[row, :len(continuation)] = True
    if int(pos.max()) + n_tail > n_ctx:  # a padded tail past n_ctx would shift its position embeddings
        return None
    cache_len = max(padded_size(int(pos.max()) + n_tail, n_ctx), n_prefix)
    return prefixes, group, pos, tails, targets, mask, cache_len


@partial(jax.jit, static_argnames=("n_head", "cache_len"))
def shared_prefix_scores(params, prefixes, group, pos, tails, targets, mask, cache_len, *, n_head):
    # [G, Lp] prefixes into KV caches once, then [B, Lk] tails from their group's cache at their own position ->
    # [B] sum of log P(target) over the masked positions, [B] whether each of them is the argmax. params: in
    # gpt.unstack_layers's layout, as in target_scores
    empty = gpt.empty_caches(params, prefixes.shape[0], n_head, cache_len)
    _, caches = gpt.transformer(params, prefixes, n_head, empty, 0)
    caches = jax.tree.map(lambda cache: cache[group], caches)  # each row its context's
    x, _ = gpt.transformer(params, tails, n_head, caches, pos)
    return scored(gpt.unembed(params, x), targets, mask)


def scored(logits, targets, mask):  # [B, K, V], [B, K], [B, K] -> [B] masked sums of log P(target), [B] all greedy
    # logits: gpt.unembed's, float32 already whatever the params' dtype
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    target_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(jnp.where(mask, target_logprobs, 0.0), axis=-1), jnp.all(greedy | ~mask, axis=-1)


@partial(jax.jit, static_argnames="n_head")
def target_scores(params, ids, positions, targets, mask, *, n_head):
    # [B, T] ids, [B, K] positions -> [B] sum of log P(target) over the masked positions, [B] whether each of them
    # is the argmax. Only the K scored positions are unembedded: over GPT-2's 50,257 tokens that is most of the work.
    # params: in gpt.unstack_layers's layout (GptjaxLM.params)
    x, _ = gpt.transformer(params, ids, n_head, None, 0)
    return scored(gpt.unembed(params, jnp.take_along_axis(x, positions[..., None], axis=1)), targets, mask)
