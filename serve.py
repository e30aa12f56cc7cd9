"""Serve GPT-2 over HTTP with OpenAI's completions API, decoding all requests together (continuous batching).

    python serve.py --model_type 124M --quantize int8               # http://127.0.0.1:8000/v1/completions
    python serve.py --model_dir path/to/model --port 8080 --slots 8 --slot_ctx 256
    curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"prompt": "Alan Turing theorized that", "max_tokens": 20, "temperature": 0}'

Routes: POST /v1/completions (OpenAI's schema: prompt as text, texts, token ids or lists of them; max_tokens,
temperature (0: greedy), top_p, n, seed, stop, logprobs (<= 5), echo, presence_penalty, frequency_penalty, logit_bias,
stream, stream_options, user; and top_k, repetition_penalty as vLLM takes them), GET /v1/models, GET /health (200 once
the programs are compiled), GET /metrics (Prometheus), and vLLM's /tokenize, /detokenize and /tokenizer_info, with
which lm-evaluation-harness's local-completions model tokenizes through the server. POST /v1/chat/completions
answers 400: GPT-2 was not trained on conversations and has no chat template.

How it runs: one thread (Engine.run) owns the model. It holds `--slots` rows, each a request's continuation with
its own KV cache of `--slot_ctx` positions, and loops: score echo requests (one forward pass, no decoding), prefill
waiting requests into free rows (join: one row at a time, the prompt padded to sampling.bucket), then one call of
the jitted decoding loop (sampling.decode) that advances every row by up to STEPS tokens (1 while requests wait for a
row, so that they join soon). A request's tokens reach its HTTP handler through an asyncio queue; a client that goes
away frees its row after the call. All rows write their next keys and values at one shared slot that goes round the
cache (a ring), and a joining prompt is written just before it: sampling.decode's masks (past) keep each row to its
own positions. Every shape is fixed, and every program compiled at start-up (warm_up): none while serving.
Speed: each step reads every row's whole cache, so --slot_ctx (like llama.cpp's context per slot) is worth sizing to
the longest prompt + max_tokens served.
"""
import argparse
import asyncio
import itertools
import json
import logging
import math
import os
import secrets
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import cli
import gpt
import sampling
import weights
from cli import UsageError

MAX_LOGPROBS = 5  # OpenAI's limit on logprobs; every step computes this many (one program for every request)
MAX_STOPS = 4
FLUSH_S = 0.005  # a pause after requests start (Engine.run)
STEPS = 8  # decoding steps per call of the decoding program, at most
PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty")
NEUTRAL = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": 0.0}
log = logging.getLogger("gptjax.serve")


# ------------------------------------------------------------------------------------------------ the jitted parts


def empty_state(params: dict, hparams: dict, n_slots: int, slot_ctx: int, kv_dtype: str | None = None) -> dict:
    """sampling.decode's state for n_slots idle rows (done), with everything the server's controls use."""
    n_vocab = hparams["n_vocab"]
    caches = gpt.empty_caches(params, n_slots, hparams["n_head"], slot_ctx, kv_dtype)
    return {"caches": jax.tree.map(jnp.array, caches), "pos": jnp.zeros(n_slots, jnp.int32),
            "past": jnp.zeros((n_slots, slot_ctx), bool), "slot": jnp.int32(0), "done": jnp.ones(n_slots, bool),
            "step": jnp.zeros(n_slots, jnp.int32), "token": jnp.zeros(n_slots, jnp.int32),
            "in_prompt": jnp.zeros((n_slots, n_vocab), bool), "counts": jnp.zeros((n_slots, n_vocab), jnp.int32),
            "logprob": jnp.zeros(n_slots), "top_logprobs": jnp.zeros((n_slots, MAX_LOGPROBS)),
            "top_ids": jnp.zeros((n_slots, MAX_LOGPROBS), jnp.int32)}


@partial(jax.jit, static_argnames=("n_head",), donate_argnames=("state",))
def join(params: dict, state: dict, ids, length, row, controls: dict, *, n_head: int) -> dict:
    # prefill one prompt (ids [1, bucket], its length) into row `row`: its keys and values go to the length slots
    # before the shared write slot (round the ring), its first token is drawn with the row's controls
    prompt_len, n_cache = ids.shape[1], state["past"].shape[-1]
    x, new = gpt.transformer(params, ids, n_head, gpt.empty_caches(params, 1, n_head, prompt_len), 0)
    logits = sampling.unembed_rows(params, x[:, length - 1])  # [1, n_vocab]
    at = (jnp.arange(n_cache) - (state["slot"] - length)) % n_cache  # the prompt position each slot receives
    mine = at < length
    source = jnp.minimum(at, prompt_len - 1)

    def placed(cache, fresh):  # [slots, n_head, n_cache, head_dim] with row's slots from fresh [1, n_head, ...]
        moved = jnp.take(fresh[0], source, axis=-2)
        return cache.at[row].set(jnp.where(mine[:, None], moved, cache[row]).astype(cache.dtype))

    caches = [jax.tree.map(placed, cache, fresh) for cache, fresh in zip(state["caches"], new)]
    n_vocab = logits.shape[-1]
    one = {"done": jnp.zeros(1, bool), "step": jnp.zeros(1, jnp.int32), "counts": jnp.zeros((1, n_vocab), jnp.int32),
           "in_prompt": sampling.tokens_in(ids, length[None], n_vocab)}
    row_controls = {name: c if name == "eot_token" else c[row][None] for name, c in controls.items()}
    one = sampling.sample(one, logits, row_controls, False, MAX_LOGPROBS)
    state = {**state, "caches": caches, "pos": state["pos"].at[row].set(length),
             "past": state["past"].at[row].set(mine)}
    for name in ("done", "step", "counts", "in_prompt", "token", "logprob", "top_logprobs", "top_ids"):
        state[name] = state[name].at[row].set(one[name][0])
    return state


@partial(jax.jit, static_argnames=("n_head",))
def score(params: dict, ids, *, n_head: int):
    """ids [1, bucket] -> the log probability of each next token [bucket - 1], and the MAX_LOGPROBS most likely
    tokens at each position with theirs ([bucket, MAX_LOGPROBS] each): what echo and logprobs report of a prompt."""
    x, _ = gpt.transformer(params, ids, n_head, None, 0)
    logp = jax.nn.log_softmax(gpt.unembed(params, x[0]).astype(jnp.float32), axis=-1)
    top_logprobs, top_ids = lax.top_k(logp, MAX_LOGPROBS)
    return logp[jnp.arange(ids.shape[1] - 1), ids[0, 1:]], top_logprobs, top_ids


# ------------------------------------------------------------------------------------------------ the engine


@dataclass
class Job:
    """One choice of a completion request, as the engine serves it, and what it has produced."""
    prompt: list
    max_tokens: int
    options: dict  # sampling.request_controls's options and first_row (the choice's index: its random stream)
    stop: list
    n_logprobs: int | None
    emit: object  # emit(event): hands an event to the request's handler, from the engine's thread
    echo_scores: bool = False  # echo with logprobs: the prompt's log probabilities too
    score_only: bool = False  # no decoding: max_tokens 0, or 1 greedy token without penalties (the scoring pass's)
    cancelled: bool = False
    ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # token_logprobs of each new token
    shown: str = ""
    created: float = field(default_factory=time.perf_counter)


class Engine:
    """The decoding loop (run, on its own thread), its rows and its queue; submit() is called by the HTTP handlers.
    A class: the loop's state (the device state, the rows' jobs, the queue) lives as long as the server."""

    def __init__(self, params, hparams, encoder, n_slots, slot_ctx, max_queue, metrics, kv_dtype=None):
        self.params, self.hparams, self.encoder, self.kv_dtype = params, hparams, encoder, kv_dtype
        self.n_slots, self.slot_ctx, self.max_queue, self.metrics = n_slots, slot_ctx, max_queue, metrics
        self.rows = [None] * n_slots  # the Job each row serves
        self.waiting = deque()
        self.wake = threading.Condition()
        self.ready = threading.Event()
        self.stopping = False
        controls = sampling.request_controls(hparams, n_slots, eot_token=encoder.eot_token)
        for name, neutral in NEUTRAL.items():  # every control present, so that one program serves every request
            controls[name] = np.full((n_slots, hparams["n_vocab"]) if name == "logit_bias" else n_slots, neutral,
                                     np.float32)
        self.controls, self.key_data = controls, np.array(jax.random.key_data(controls.pop("key")))
        self.sent_controls, self.state = None, None

    def submit(self, jobs) -> bool:  # queue a request's jobs; False when max_queue jobs wait already
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                return False
            self.waiting.extend(jobs)
            self.metrics["queue"].set(len(self.waiting))
            self.wake.notify()
        return True

    def stop(self):
        with self.wake:
            self.stopping = True
            self.wake.notify()

    def run(self):
        # committed to the device as the programs' outputs are, so that warm-up compiles for the arguments of later
        # calls (a jit program is specialised on whether its arguments are committed)
        self.state = jax.device_put(empty_state(self.params, self.hparams, self.n_slots, self.slot_ctx, self.kv_dtype),
                                    jax.devices()[0])
        self.warm_up()
        self.ready.set()
        while True:
            with self.wake:
                while not self.stopping and not self.waiting and not any(self.rows):
                    self.wake.wait()
                if self.stopping:
                    return
                starting = self.admitted()
            for job, row in starting:
                self.start(job, row)
            if starting:  # let the HTTP thread send the first tokens: a decoding call keeps both cores busy (124M,
                time.sleep(FLUSH_S)  # 1 client: time to first token 231 -> 69 ms)
            if any(self.rows):
                self.step()

    def admitted(self):  # -> [(job, row)] to start now: a score_only job needs no row, the others a free one
        starting = []
        free = [row for row, job in enumerate(self.rows) if job is None]
        while self.waiting and (self.waiting[0].score_only or free):
            job = self.waiting.popleft()
            row = None if job.score_only else free.pop(0)
            if row is not None:
                self.rows[row] = job
            starting.append((job, row))
        self.metrics["queue"].set(len(self.waiting))
        return starting

    def warm_up(self):
        # every program serving can need, compiled now, through the paths requests take: a request of each prompt
        # bucket, scored and decoded, and a decoding call of each kind step() makes
        bucket = sampling.MIN_BUCKET
        while True:
            for job in (Job([0] * bucket, 0, {}, [], 1, lambda event: None, echo_scores=True, score_only=True),
                        Job([0] * min(bucket, self.slot_ctx - 1), 3, {"presence_penalty": 0.5}, [], 1,
                            lambda event: None)):
                self.rows[0] = None if job.score_only else job
                self.start(job, 0)
            for n_logprobs, greedy, penalties in itertools.product((0, MAX_LOGPROBS), (False, True), (False, True)):
                self.decode_steps(1, n_logprobs, greedy, penalties)
            self.finish(0, None)
            if bucket >= self.hparams["n_ctx"]:
                break
            bucket = sampling.bucket(bucket + 1, self.hparams["n_ctx"])

    def start(self, job, row):
        if job.cancelled:
            if row is not None:
                self.rows[row] = None
            return
        if job.echo_scores or job.score_only:
            self.score(job)
            if job.score_only:
                return
        self.set_row_controls(row, job.options)
        ids = np.zeros((1, sampling.bucket(len(job.prompt), self.slot_ctx)), np.int32)
        ids[0, :len(job.prompt)] = job.prompt
        self.state = join(self.params, self.state, ids, np.int32(len(job.prompt)), np.int32(row),
                          self.device_controls(), n_head=self.hparams["n_head"])
        self.metrics["slots"].set(sum(r is not None for r in self.rows))
        first = jax.device_get({name: self.state[name] for name in STEP_OUTPUTS})  # whole: no program per row
        self.deliver(row, {name: column[row] for name, column in first.items()})

    def set_row_controls(self, row, options):  # the row's entries of the batch's controls: the request's options
        one = sampling.request_controls(self.hparams, 1, **options)
        self.key_data[row] = jax.random.key_data(one["key"])[0]
        for name, column in self.controls.items():
            if name != "eot_token":
                column[row] = one[name][0] if name in one else NEUTRAL[name]
        self.sent_controls = None

    def decode_steps(self, n_steps=1, n_logprobs=0, greedy=False, penalties=True):  # n_steps tokens for every row:
        # {"token": [slots, STEPS], and with n_logprobs "logprob", "top_ids", "top_logprobs"}, numpy
        out, self.state = sampling.decode(self.params, self.state, np.int32(n_steps), self.device_controls(penalties),
                                          n_head=self.hparams["n_head"], chunk=STEPS, greedy=greedy,
                                          n_logprobs=n_logprobs)
        return jax.device_get(out)

    def device_controls(self, penalties=True):
        # the controls on the device (sent again only after a row's have changed), with the penalties or without
        if self.sent_controls is None:
            self.sent_controls = jax.device_put({**self.controls, "key": jax.random.wrap_key_data(self.key_data)})
        if penalties:
            return self.sent_controls
        return {name: c for name, c in self.sent_controls.items() if name not in PENALTIES}

    def step(self):
        started = time.perf_counter()
        jobs = [(row, job) for row, job in enumerate(self.rows) if job is not None]
        # what only some requests need is left out of the step while none does, in a program of its own: log
        # probabilities (124M, 8 rows: ~1.7 ms a step), drawing at random (~10 ms; greedy rows take the argmax), the
        # penalties (~10% of a step)
        wanted = any(job.n_logprobs is not None for _, job in jobs)
        greedy = all(job.options.get("greedy") for _, job in jobs)
        penalties = any(job.options.get(name) is not None for _, job in jobs for name in PENALTIES)
        # STEPS tokens a call (a host round trip a step cost ~15% of 124M's 8-row step), 1 while a request waits
        n_steps = 1 if self.waiting else STEPS
        out = self.decode_steps(n_steps, MAX_LOGPROBS if wanted else 0, greedy, penalties)
        self.metrics["token_time"].observe((time.perf_counter() - started) / n_steps)
        for row, job in jobs:
            for i in range(n_steps):
                if self.rows[row] is not job:  # finished: the rest of its tokens are not its own
                    break
                self.deliver(row, {name: column[row, i] for name, column in out.items()})

    def deliver(self, row, new):
        # a row's new token ({"token", and "logprob", "top_ids", "top_logprobs" when computed}): to its job's text
        # (stop strings), its handler (an event), and the end of the job
        job = self.rows[row]
        if job.cancelled:
            return self.finish(row, None)
        if not job.ids:
            self.metrics["ttft"].observe(time.perf_counter() - job.created)
        token = int(new["token"])
        if token == self.encoder.eot_token:
            return self.finish(row, "stop", self.tail(job))
        job.ids.append(token)
        self.metrics["tokens"].inc()
        if job.n_logprobs is not None:
            job.logprobs.append(token_logprobs(new["logprob"], new["top_ids"], new["top_logprobs"], job.n_logprobs))
        text, stopped = sampling.visible_text(self.encoder.decode(job.ids), job.stop)
        piece, job.shown = text[len(job.shown):], text
        if stopped:
            return self.finish(row, "stop", piece)
        if len(job.ids) == job.max_tokens:
            return self.finish(row, "length", piece + self.tail(job))
        job.emit({"text": piece, "n_tokens": len(job.ids)})

    def tail(self, job):  # what visible_text held back, at the end of a continuation that reached no stop string
        text = sampling.cut_at_stop(self.encoder.decode(job.ids), job.stop)[0]
        piece, job.shown = text[len(job.shown):], text
        return piece

    def finish(self, row, reason, piece=""):
        job, self.rows[row] = self.rows[row], None
        self.state = sampling.end_rows(self.state, np.arange(self.n_slots) == row)  # done: it draws nothing
        self.metrics["slots"].set(sum(r is not None for r in self.rows))
        if reason is not None:  # None: cancelled, no one to tell
            job.emit({"text": piece, "finish_reason": reason})

    def score(self, job):
        # the prompt's log probabilities in one forward pass (echo with logprobs); a score_only job also takes its
        # new token (if any) from it: the most likely, as greedy decoding would
        n = len(job.prompt)
        ids = np.zeros((1, sampling.bucket(n, self.hparams["n_ctx"])), np.int32)
        ids[0, :n] = job.prompt
        next_logp, top_logprobs, top_ids = jax.device_get(score(self.params, ids, n_head=self.hparams["n_head"]))
        if job.echo_scores:
            job.emit({"prompt_logprobs": [None] + [token_logprobs(lp, top_ids[i], top_logprobs[i], job.n_logprobs)
                                                   for i, lp in enumerate(next_logp[:n - 1])]})
        if not job.score_only:
            return
        token = int(top_ids[n - 1, 0])
        if job.max_tokens == 0 or token == self.encoder.eot_token:
            return job.emit({"text": "", "finish_reason": "length" if job.max_tokens == 0 else "stop"})
        job.ids.append(token)
        self.metrics["tokens"].inc()
        if job.n_logprobs is not None:
            job.logprobs.append(token_logprobs(top_logprobs[n - 1, 0], top_ids[n - 1], top_logprobs[n - 1],
                                               job.n_logprobs))
        text, stopped = sampling.visible_text(self.encoder.decode(job.ids), job.stop)
        job.emit({"text": text if stopped else self.tail(job), "finish_reason": "stop" if stopped else "length"})


STEP_OUTPUTS = ("token", "logprob", "top_ids", "top_logprobs")


def token_logprobs(logprob, top_ids, top_logprobs, n) -> tuple[float, dict]:  # (a token's, {n most likely: theirs})
    return float(logprob), {int(t): float(lp) for t, lp in zip(top_ids[:n], top_logprobs[:n])}


# ------------------------------------------------------------------------------------------------ requests


class BadRequest(ValueError):
    """A request that cannot be served as asked: HTTP 400 with OpenAI's error object."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "logprobs", "echo",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "stream", "stream_options",
          "user"}


def number(body, name, default, low, high, integer=False, low_open=False):
    # body[name] (None or absent: default) as a number in [low, high] ((low, high] with low_open); else BadRequest
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise BadRequest(f"{name} must be {kind}, got {json.dumps(value)[:40]}", name)
    if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
        raise BadRequest(f"{name} must be {kind} {'above' if low_open else 'from'} {low} {'up ' if low_open else ''}"
                         f"to {high}, got {value}", name)
    return value


def flag(body, name):
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {json.dumps(value)[:40]}", name)
    return value


def prompts_of(body, encoder, n_vocab):  # the prompt field -> a list of token id lists
    prompt = body.get("prompt")
    is_ids = lambda p: isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
    if isinstance(prompt, str) or is_ids(prompt) and prompt:
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or is_ids(p) for p in prompt):
        raise BadRequest("prompt must be a text, a list of texts, a list of token ids or a list of such lists",
                         "prompt")
    out = []
    for p in prompt:
        ids = encoder.encode(p) if isinstance(p, str) else p
        try:
            sampling.check_token_ids(ids, n_vocab, "prompt")
        except ValueError as e:
            raise BadRequest(str(e), "prompt") from None
        out.append(ids or [encoder.eot_token])  # an empty prompt: the text's start, <|endoftext|>, as in training
    return out


def completion_request(body, encoder, hparams, n_slots, slot_ctx) -> dict:
    """A completion request's JSON body, checked -> what the handler needs. BadRequest names the first problem."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise BadRequest(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    prompts = prompts_of(body, encoder, hparams["n_vocab"])
    req = {"prompts": prompts, "max_tokens": number(body, "max_tokens", 16, 0, hparams["n_ctx"], integer=True),
           "n": number(body, "n", 1, 1, n_slots, integer=True), "echo": flag(body, "echo"),
           "stream": flag(body, "stream"), "logprobs": number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)}
    temperature = number(body, "temperature", 1.0, 0, 2)
    top_k = number(body, "top_k", -1, -1, hparams["n_vocab"], integer=True)
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise BadRequest("logit_bias must be an object of token ids and biases", "logit_bias")
    try:
        logit_bias = {int(t): number(bias, t, 0, -100, 100) for t in bias}
    except (ValueError, BadRequest) as e:
        raise BadRequest(f"logit_bias: {e}" if isinstance(e, BadRequest) else "logit_bias's keys must be token ids",
                         "logit_bias") from None
    seed = number(body, "seed", None, 0, 2**63 - 1, integer=True)
    req["options"] = dict(greedy=temperature == 0, temperature=temperature or 1.0, top_k=top_k if top_k > 0 else None,
                          top_p=number(body, "top_p", 1.0, 0, 1, low_open=True),
                          seed=secrets.randbelow(2**63) if seed is None else seed,
                          presence_penalty=number(body, "presence_penalty", None, -2, 2),
                          frequency_penalty=number(body, "frequency_penalty", None, -2, 2),
                          repetition_penalty=number(body, "repetition_penalty", None, 0, math.inf, low_open=True),
                          logit_bias=logit_bias)
    try:
        sampling.check_options(hparams, **req["options"])
    except ValueError as e:
        raise BadRequest(str(e)) from None
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
        raise BadRequest(f"stop must be a text or a list of up to {MAX_STOPS} texts", "stop")
    req["stop"] = stop
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    req["include_usage"] = req["stream"] and options.get("include_usage", False)
    if not isinstance(body.get("user", ""), str) or not isinstance(body.get("model", ""), str):
        raise BadRequest("model and user must be texts", "model" if not isinstance(body.get("model", ""), str)
                         else "user")
    if len(prompts) * req["n"] > n_slots:
        raise BadRequest(f"{len(prompts)} prompts x n={req['n']} choices is more than the server's {n_slots} slots: "
                         f"send fewer at once", "n")
    for ids in prompts:
        limit = hparams["n_ctx"] if plain_scoring(req) else slot_ctx
        if len(ids) + req["max_tokens"] > limit:
            raise BadRequest(f"This model's maximum context length is {limit} tokens, however you requested "
                             f"{len(ids) + req['max_tokens']} tokens ({len(ids)} in your prompt; {req['max_tokens']} "
                             f"for the completion). Please reduce your prompt; or completion length.", "max_tokens")
    return req


def plain_scoring(req) -> bool:
    # no decoding needed: nothing to generate, or one greedy token with nothing that changes the logits
    o = req["options"]
    plain = o["greedy"] and not o["logit_bias"] and (o["presence_penalty"], o["frequency_penalty"],
                                                     o["repetition_penalty"]) == (None, None, None)
    return req["max_tokens"] == 0 or req["max_tokens"] == 1 and plain


def logprobs_object(encoder, entries, start_offset) -> dict:
    # OpenAI's logprobs of a choice: entries are (token id, token_logprobs(...) or None) in order
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start_offset
    for token, scored in entries:
        text = encoder.decode([token])
        out["tokens"].append(text)
        out["token_logprobs"].append(None if scored is None else scored[0])
        out["top_logprobs"].append(None if scored is None else
                                   {encoder.decode([t]): lp for t, lp in scored[1].items()})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


# ------------------------------------------------------------------------------------------------ the HTTP layer


def error_response(status, message, param=None, kind="invalid_request_error"):
    from fastapi.responses import JSONResponse
    log.warning("%d %s", status, message)
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def make_app(engine, model_name):
    """The FastAPI application: routes that check requests, hand their jobs to the engine and answer as OpenAI's
    API does."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import generate_latest
    from starlette.exceptions import HTTPException

    app = FastAPI(title="gptjax", docs_url=None, redoc_url=None)
    encoder, hparams, metrics = engine.encoder, engine.hparams, engine.metrics

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # unknown routes and methods, in OpenAI's shape too
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.get("/health")
    async def health():
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "gptjax"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics["registry"]).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/tokenizer_info")
    async def tokenizer_info():  # vLLM's, as lm-evaluation-harness's remote tokenizer asks for it
        eot = encoder.decode([encoder.eot_token])
        return {"eos_token": eot, "bos_token": eot, "pad_token": None, "model_max_length": hparams["n_ctx"]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return error_response(400, "tokenize takes {\"prompt\": text}", "prompt")
        tokens = encoder.encode(body["prompt"])
        return {"tokens": tokens, "count": len(tokens), "max_model_len": hparams["n_ctx"]}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            ids = body["tokens"]
            sampling.check_token_ids(ids, hparams["n_vocab"], "tokens")
        except (TypeError, KeyError, ValueError) as e:
            return error_response(400, f"detokenize takes {{\"tokens\": [ids]}}: {e}", "tokens")
        return {"prompt": encoder.decode(ids)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return error_response(400, "GPT-2 is not a chat model: it was trained on web text, not conversations, and "
                                   "has no chat template; use /v1/completions with a text prompt", "messages")

    @app.post("/v1/completions")
    async def completions(request: Request):
        if not engine.ready.is_set():
            return error_response(503, "the server is still compiling its programs: retry in a moment",
                                  kind="server_error")
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            req = completion_request(body, encoder, hparams, engine.n_slots, engine.slot_ctx)
        except BadRequest as e:
            metrics["requests"].labels("400").inc()
            return error_response(400, str(e), e.param)
        queue, loop = asyncio.Queue(), asyncio.get_running_loop()
        jobs = [Job(ids, req["max_tokens"], {**req["options"], "first_row": i * req["n"] + j}, req["stop"],
                    req["logprobs"], partial(hand_over, loop, queue, i * req["n"] + j),
                    echo_scores=req["echo"] and req["logprobs"] is not None, score_only=plain_scoring(req))
                for i, ids in enumerate(req["prompts"]) for j in range(req["n"])]
        if not engine.submit(jobs):
            metrics["requests"].labels("429").inc()
            return error_response(429, f"the server is busy ({engine.max_queue} requests waiting): retry later",
                                  kind="rate_limit_error")
        metrics["requests"].labels("200").inc()
        metrics["prompt_tokens"].inc(sum(map(len, req["prompts"])))
        answer = Answer(req, jobs, encoder, model_name)
        if req["stream"]:
            return StreamingResponse(answer.events(queue), media_type="text/event-stream")
        watcher = asyncio.create_task(cancel_on_disconnect(request, jobs))
        try:
            return await answer.whole(queue)
        finally:
            watcher.cancel()

    return app


def hand_over(loop, queue, index, event):  # from the engine's thread to the request's handler
    loop.call_soon_threadsafe(queue.put_nowait, (index, event))


async def json_body(request):
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return error_response(400, f"the request body is not valid JSON: {e}")


async def cancel_on_disconnect(request, jobs):
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)
    for job in jobs:
        job.cancelled = True


@dataclass
class Answer:
    """A completion request's answer, assembled from its jobs' events: whole, or as server-sent events."""
    req: dict
    jobs: list
    encoder: object
    model: str
    id: str = field(default_factory=lambda: f"cmpl-{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))

    def prompt_text(self, index):
        return self.encoder.decode(self.jobs[index].prompt) if self.req["echo"] else ""

    def choice(self, index, text, finish_reason, logprobs=None):
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def logprobs(self, index, prompt_scores, new_from):
        # the choice's logprobs: the prompt's (echo) and its new tokens' from new_from on
        if self.req["logprobs"] is None:
            return None
        job = self.jobs[index]
        entries = list(zip(job.prompt, prompt_scores)) if prompt_scores is not None else []
        entries += list(zip(job.ids[new_from:], job.logprobs[new_from:]))
        # offsets count from the prompt's start, as OpenAI's do
        start = 0 if prompt_scores is not None else len(self.encoder.decode(job.prompt + job.ids[:new_from]))
        return logprobs_object(self.encoder, entries, start)

    def usage(self):
        prompt = sum(map(len, self.req["prompts"]))
        new = sum(len(job.ids) for job in self.jobs)
        return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}

    def body(self, choices, **extra):
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    async def whole(self, queue):
        texts, reasons = [self.prompt_text(i) for i in range(len(self.jobs))], [None] * len(self.jobs)
        scores = [None] * len(self.jobs)
        while None in reasons:
            index, event = await queue.get()
            if "prompt_logprobs" in event:
                scores[index] = event["prompt_logprobs"]
                continue
            texts[index] += event["text"]
            reasons[index] = event.get("finish_reason")
        choices = [self.choice(i, texts[i], reasons[i], self.logprobs(i, scores[i], 0))
                   for i in range(len(self.jobs))]
        return self.body(choices, usage=self.usage())

    async def events(self, queue):
        # OpenAI's stream: a chunk per new piece of text, the last of a choice with its finish_reason, then (with
        # stream_options.include_usage) the usage, then [DONE]
        sent, scores, open_choices = [0] * len(self.jobs), [None] * len(self.jobs), len(self.jobs)
        try:
            for i in range(len(self.jobs)) if self.req["echo"] and self.req["logprobs"] is None else ():
                yield sse(self.body([self.choice(i, self.prompt_text(i), None)]))
            while open_choices:
                index, event = await queue.get()
                if "prompt_logprobs" in event:
                    scores[index] = event["prompt_logprobs"]
                    continue
                text = event["text"]
                if scores[index] is not None:  # echo with logprobs: the prompt goes with its scores, first
                    text = self.prompt_text(index) + text
                logprobs = self.logprobs(index, scores[index], sent[index])
                scores[index], sent[index] = None, len(self.jobs[index].ids)
                finish_reason = event.get("finish_reason")
                open_choices -= finish_reason is not None
                yield sse(self.body([self.choice(index, text, finish_reason, logprobs)]))
            if self.req["include_usage"]:
                yield sse(self.body([], usage=self.usage()))
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away: its rows are freed at the next step
            for job in self.jobs:
                job.cancelled = True


def sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


# ------------------------------------------------------------------------------------------------ the command line


def new_metrics() -> dict:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    registry = CollectorRegistry()
    seconds = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
    return {"registry": registry,
            "requests": Counter("gptjax_requests", "completion requests, by HTTP status", ["status"],
                                registry=registry),
            "prompt_tokens": Counter("gptjax_prompt_tokens", "prompt tokens received", registry=registry),
            "tokens": Counter("gptjax_generation_tokens", "tokens generated", registry=registry),
            "queue": Gauge("gptjax_queue_depth", "choices waiting for a slot", registry=registry),
            "slots": Gauge("gptjax_slots_in_use", "slots decoding a request", registry=registry),
            "ttft": Histogram("gptjax_time_to_first_token_seconds", "from a request's arrival to its first token",
                              buckets=seconds, registry=registry),
            "token_time": Histogram("gptjax_time_per_output_token_seconds", "one decoding step (a token for every "
                                    "slot)", buckets=seconds, registry=registry)}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_type", default="124M", choices=weights.MODEL_SIZES, help="OpenAI's release size")
    ap.add_argument("--models_dir", default="models", help="where the releases are downloaded")
    ap.add_argument("--model_dir", help="a model folder (OpenAI's, Hugging Face's or train.py's layout)")
    ap.add_argument("--quantize", choices=["int8"], help="int8 weights: ~2x the decoding speed on a CPU (main.py's)")
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=8000, help="the port to listen on (0: any free one, printed)")
    ap.add_argument("--slots", type=int, default=8, help="requests (choices) decoded together")
    ap.add_argument("--slot_ctx", type=int, help="positions each slot holds, prompt + max_tokens (default: the "
                                                 "model's n_ctx); every step reads them all")
    ap.add_argument("--kv_cache", choices=["float32", "bfloat16"], help="the KV cache's dtype (default: float32): "
                    "bfloat16 halves its memory, so twice the slots or --slot_ctx fit; on a CPU slower (README: Speed)")
    ap.add_argument("--max_queue", type=int, default=256, help="choices that may wait for a slot; beyond, HTTP 429")
    ap.add_argument("--name", help="the model's id in the API (default: the model's size or folder name)")
    return cli.parse_args(ap, argv)


def run(args):
    import socket

    import uvicorn
    if args.slots < 1 or args.max_queue < 1:
        raise UsageError("--slots and --max_queue must be at least 1")
    if args.model_dir is not None and not os.path.isdir(args.model_dir):
        raise UsageError(f"--model_dir {args.model_dir} is not a folder: give a model folder, or --model_type")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be from 0 (any free port) to 65535, got {args.port}")
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    cli.setup()
    encoder, hparams, params = weights.load_encoder_hparams_and_params(args.model_dir or args.model_type,
                                                                       args.models_dir, None, args.quantize)
    slot_ctx = args.slot_ctx or hparams["n_ctx"]
    if not 2 <= slot_ctx <= hparams["n_ctx"]:
        raise UsageError(f"--slot_ctx must be from 2 to the model's n_ctx={hparams['n_ctx']}, got {slot_ctx}")
    if encoder.eot_token is None:
        raise UsageError("this model's vocabulary has no <|endoftext|> token, which ends a completion")
    name = args.name or (os.path.basename(os.path.normpath(args.model_dir)) if args.model_dir else args.model_type)
    engine = Engine(gpt.unstack_layers(params), hparams, encoder, args.slots, slot_ctx, args.max_queue,
                    new_metrics(), args.kv_cache)
    host, port = sock.getsockname()[:2]

    def serve_engine():
        try:
            engine.run()
        except Exception:  # the server cannot go on without its model: say so, and stop taking requests
            log.exception("the decoding loop failed")
            server.should_exit = True

    def announce():
        engine.ready.wait()
        kv_dtype = engine.state["caches"][0]["k"].dtype  # as built
        print(f"serving {name} at http://{host}:{port}/v1 ({args.slots} slots of {slot_ctx} positions, {kv_dtype} "
              f"KV cache)",
              file=sys.stderr, flush=True)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    server = uvicorn.Server(uvicorn.Config(make_app(engine, name), log_level="warning",
                                           timeout_graceful_shutdown=60))
    threading.Thread(target=serve_engine, daemon=True, name="engine").start()
    threading.Thread(target=announce, daemon=True).start()
    # uvicorn takes SIGTERM and SIGINT while it runs: it stops taking requests, lets those in flight finish, then
    # raises the signal again for the handler it found. For SIGTERM that is this one: a drained server exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
    print("stopped", file=sys.stderr, flush=True)


def main(argv=None):
    return cli.run(lambda argv: run(parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
