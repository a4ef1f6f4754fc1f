// The official `openai` npm SDK (tools/node_modules, pinned in tools/package.json)
// against a running expertmesh cluster's HTTP API. Driven by test_openai_sdk.py,
// which starts the cluster and computes the expected texts with `expertmesh
// generate` + `expertmesh tokenize --decode`; this file only speaks HTTP
// through the SDK (and `expertmesh jobs` over gRPC to see a cancelled job).
//
//   node test_openai_sdk.mjs --base http://127.0.0.1:PORT --expect expect.json --case all|NAME[,NAME]
//     [--grpc HOST:PORT --expertmesh PATH]
//
// Prints `ok NAME` per case; the first failure prints `FAIL NAME: why` and exits 1.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({
  options: {
    base: { type: 'string' },
    expect: { type: 'string' },
    case: { type: 'string', default: 'all' },
    grpc: { type: 'string' },
    expertmesh: { type: 'string' },
    root: { type: 'string' },
    'request-id': { type: 'string' },
  },
});
const root = args.root ?? new URL('../..', import.meta.url).pathname;
let OpenAI;
try {
  const require = createRequire(`${root}/tools/package.json`);
  OpenAI = (await import(require.resolve('openai'))).default;
} catch (e) {
  console.log(`FAIL setup: the openai npm package is not in ${root}/tools/node_modules: run scripts/install-deps.sh (${e.message})`);
  process.exit(1);
}
const expect = args.expect ? JSON.parse(readFileSync(args.expect, 'utf8')) : {};
const client = new OpenAI({ baseURL: `${args.base}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 120_000 });

async function collectChat(stream) {
  const out = { chunks: [], text: {}, finish: {}, usage: null, roles: {} };
  for await (const chunk of stream) {
    out.chunks.push(chunk);
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) out.usage = chunk.usage;
    for (const c of chunk.choices) {
      out.text[c.index] = (out.text[c.index] ?? '') + (c.delta?.content ?? '');
      if (c.delta?.role) out.roles[c.index] = c.delta.role;
      if (c.finish_reason) out.finish[c.index] = c.finish_reason;
    }
  }
  return out;
}

async function collectCompletion(stream) {
  const out = { chunks: [], text: {}, finish: {}, usage: null };
  for await (const chunk of stream) {
    out.chunks.push(chunk);
    assert.equal(chunk.object, 'text_completion');
    if (chunk.usage) out.usage = chunk.usage;
    for (const c of chunk.choices) {
      out.text[c.index] = (out.text[c.index] ?? '') + (c.text ?? '');
      if (c.finish_reason) out.finish[c.index] = c.finish_reason;
    }
  }
  return out;
}

function checkUsage(usage, prompt, completion) {
  assert.ok(usage, 'no usage');
  assert.equal(usage.prompt_tokens, prompt, 'usage.prompt_tokens');
  assert.equal(usage.completion_tokens, completion, 'usage.completion_tokens');
  assert.equal(usage.total_tokens, prompt + completion, 'usage.total_tokens');
}

const G = () => expect.greedy;
// The served model's name (expect.model: the checkpoint folder's name, --served-model-name's default).  // {messages, prompt, prompt_ids, chat_prompt_tokens, prompt_tokens, max_tokens, chat_text, completion_text}

const cases = {
  async models() {
    const list = await client.models.list();
    assert.ok(list.data.length >= 1, 'GET /v1/models lists no model');
    assert.equal(list.data[0].object, 'model');
    if (expect.model) assert.equal(list.data[0].id, expect.model);
  },

  // Greedy text = `expertmesh generate` tokens of the rendered chat prompt, detokenised.
  async chat_greedy() {
    const g = G();
    const r = await client.chat.completions.create({ model: expect.model, messages: g.messages, max_tokens: g.max_tokens,
                                                     temperature: 0 });
    assert.equal(r.object, 'chat.completion');
    assert.equal(r.choices.length, 1);
    assert.equal(r.choices[0].message.role, 'assistant');
    assert.equal(r.choices[0].message.content, g.chat_text, 'content != detokenised `generate` tokens');
    assert.equal(r.choices[0].finish_reason, 'length');
    checkUsage(r.usage, g.chat_prompt_tokens, g.max_tokens);
  },

  async chat_stream() {
    const g = G();
    const s = await client.chat.completions.create({ model: expect.model, messages: g.messages, max_tokens: g.max_tokens,
                                                     temperature: 0, stream: true,
                                                     stream_options: { include_usage: true } });
    const out = await collectChat(s);
    assert.equal(out.text[0], g.chat_text, 'streamed content != detokenised `generate` tokens');
    assert.equal(out.roles[0], 'assistant');
    assert.equal(out.finish[0], 'length');
    const ids = new Set(out.chunks.map((c) => c.id));
    assert.equal(ids.size, 1, 'one id for all chunks');
    // Per-token streaming: more than one chunk carries text.
    const withText = out.chunks.filter((c) => c.choices.some((x) => x.delta?.content));
    assert.ok(withText.length >= 2, `only ${withText.length} chunk(s) carried text: not streamed per token`);
    checkUsage(out.usage, g.chat_prompt_tokens, g.max_tokens);
    // Without include_usage no chunk has usage.
    const s2 = await client.chat.completions.create({ model: expect.model, messages: g.messages, max_tokens: 2,
                                                      temperature: 0, stream: true });
    const out2 = await collectChat(s2);
    assert.equal(out2.usage, null, 'usage sent without stream_options.include_usage');
  },

  async completions() {
    const g = G();
    const r = await client.completions.create({ model: expect.model, prompt: g.prompt, max_tokens: g.max_tokens,
                                                temperature: 0 });
    assert.equal(r.object, 'text_completion');
    assert.equal(r.choices[0].text, g.completion_text, 'completion text != detokenised `generate` tokens');
    assert.equal(r.choices[0].finish_reason, 'length');
    checkUsage(r.usage, g.prompt_tokens, g.max_tokens);
    // The same prompt as token ids.
    const r2 = await client.completions.create({ model: expect.model, prompt: g.prompt_ids, max_tokens: g.max_tokens,
                                                 temperature: 0 });
    assert.equal(r2.choices[0].text, g.completion_text, 'prompt as token ids');
    checkUsage(r2.usage, g.prompt_ids.length, g.max_tokens);
    const s = await client.completions.create({ model: expect.model, prompt: g.prompt, max_tokens: g.max_tokens,
                                                temperature: 0, stream: true, stream_options: { include_usage: true } });
    const out = await collectCompletion(s);
    assert.equal(out.text[0], g.completion_text, 'streamed completion');
    assert.equal(out.finish[0], 'length');
    checkUsage(out.usage, g.prompt_tokens, g.max_tokens);
  },

  // n > 1: n choices, seeded sampling reproducible, streamed and not.
  async n_choices() {
    const g = G();
    const req = { model: expect.model, messages: g.messages, max_tokens: 6, temperature: 1.0, seed: 7, n: 3 };
    const r = await client.chat.completions.create(req);
    assert.deepEqual(r.choices.map((c) => c.index), [0, 1, 2]);
    for (const c of r.choices) assert.equal(c.finish_reason, 'length');
    checkUsage(r.usage, g.chat_prompt_tokens, 18);
    const texts = r.choices.map((c) => c.message.content);
    const again = await client.chat.completions.create(req);
    assert.deepEqual(again.choices.map((c) => c.message.content), texts, 'same seed, different texts');
    const s = await client.chat.completions.create({ ...req, stream: true, stream_options: { include_usage: true } });
    const out = await collectChat(s);
    assert.deepEqual([0, 1, 2].map((i) => out.text[i]), texts, 'streamed n=3 != non-streamed');
    assert.deepEqual([0, 1, 2].map((i) => out.finish[i]), ['length', 'length', 'length']);
    checkUsage(out.usage, g.chat_prompt_tokens, 18);
    const c = await client.completions.create({ model: expect.model, prompt: g.prompt, max_tokens: 4, n: 2,
                                                temperature: 1.0, seed: 3 });
    assert.deepEqual(c.choices.map((x) => x.index), [0, 1]);
  },

  // stop strings: matched on text (across token boundaries), not included, finish_reason "stop".
  async stop_strings() {
    const g = G();
    const full = g.chat_text;
    const [at, len] = expect.stop_cut;  // a substring of the greedy text that spans a token boundary
    const stop = full.slice(at, at + len);
    const want = full.slice(0, full.indexOf(stop));
    const r = await client.chat.completions.create({ model: expect.model, messages: g.messages,
                                                     max_tokens: g.max_tokens, temperature: 0, stop: [stop, 'never-seen-xyz'] });
    assert.equal(r.choices[0].message.content, want, `stop ${JSON.stringify(stop)}`);
    assert.equal(r.choices[0].finish_reason, 'stop');
    const s = await client.chat.completions.create({ model: expect.model, messages: g.messages,
                                                     max_tokens: g.max_tokens, temperature: 0, stop, stream: true });
    const out = await collectChat(s);
    assert.equal(out.text[0], want, 'streamed, with a stop string');
    assert.equal(out.finish[0], 'stop');
    const c = await client.completions.create({ model: expect.model, prompt: g.prompt, max_tokens: g.max_tokens,
                                                temperature: 0, stop: expect.completion_stop });
    const cfull = g.completion_text;
    assert.equal(c.choices[0].text, cfull.slice(0, cfull.indexOf(expect.completion_stop)));
    assert.equal(c.choices[0].finish_reason, 'stop');
  },

  // Each bad field: HTTP 400 in OpenAI's error shape (the SDK's BadRequestError); unknown model: 404.
  async bad_requests() {
    const g = G();
    const ok = { model: expect.model, messages: g.messages, max_tokens: 2 };
    const bad = [
      ['messages missing', { model: expect.model, max_tokens: 2 }],
      ['messages empty', { ...ok, messages: [] }],
      ['a message without role', { ...ok, messages: [{ content: 'hi' }] }],
      ['an unknown role', { ...ok, messages: [{ role: 'wizard', content: 'hi' }] }],
      ['content a number', { ...ok, messages: [{ role: 'user', content: 5 }] }],
      ['temperature < 0', { ...ok, temperature: -1 }],
      ['temperature a string', { ...ok, temperature: 'hot' }],
      ['top_p > 1', { ...ok, top_p: 1.5 }],
      ['top_p <= 0', { ...ok, top_p: 0 }],
      ['max_tokens 0', { ...ok, max_tokens: 0 }],
      ['max_tokens negative', { ...ok, max_tokens: -3 }],
      ['max_tokens past the context', { ...ok, max_tokens: 10_000_000 }],
      ['n 0', { ...ok, n: 0 }],
      ['stop a number', { ...ok, stop: 7 }],
      ['seed a string', { ...ok, seed: 'x' }],
      ['stream a string', { ...ok, stream: 'yes' }],
    ];
    for (const [what, body] of bad) {
      let err = null;
      try {
        await client.chat.completions.create(body);
      } catch (e) {
        err = e;
      }
      assert.ok(err instanceof OpenAI.BadRequestError,
                `${what}: want BadRequestError (400), got ${err ? `${err.constructor.name} ${err.status} ${err.message}` : 'success'}`);
      assert.ok(err.error?.message, `${what}: no error.message in the body`);
    }
    const badCompletions = [
      ['prompt missing', { model: expect.model, max_tokens: 2 }],
      ['prompt token id out of range', { model: expect.model, prompt: [1, 99999999], max_tokens: 2 }],
      ['prompt an object', { model: expect.model, prompt: { a: 1 }, max_tokens: 2 }],
    ];
    for (const [what, body] of badCompletions) {
      let err = null;
      try {
        await client.completions.create(body);
      } catch (e) {
        err = e;
      }
      assert.ok(err instanceof OpenAI.BadRequestError, `completions, ${what}: want 400, got ${err?.status ?? 'success'}`);
    }
    let err = null;
    try {
      await client.chat.completions.create({ ...ok, model: 'no-such-model' });
    } catch (e) {
      err = e;
    }
    assert.ok(err instanceof OpenAI.NotFoundError, `unknown model: want 404, got ${err?.status ?? 'success'}`);
  },

  // A client that closes the stream cancels its job: `expertmesh jobs` shows it CANCELLED.
  async cancel_by_disconnect() {
    const g = G();
    const key = `sdk-cancel-${process.pid}-${Date.now()}`;
    const controller = new AbortController();
    const s = await client.chat.completions.create(
        { model: expect.model, messages: g.messages, max_tokens: expect.long_max_tokens, temperature: 0, stream: true },
        { signal: controller.signal, headers: { 'Idempotency-Key': key } });
    let chunks = 0;
    try {
      for await (const chunk of s) {
        if (chunk.choices[0]?.delta?.content && ++chunks === 2) controller.abort();
      }
    } catch (e) {
      if (!(e instanceof OpenAI.APIUserAbortError) && e.name !== 'AbortError') throw e;
    }
    assert.equal(chunks, 2, 'the stream ended before the client aborted it');
    let last = '';
    for (let i = 0; i < 100; ++i) {
      const jobs = JSON.parse(execFileSync(args.expertmesh, ['jobs', '--server', args.grpc, '--json'],
                                           { encoding: 'utf8' })).jobs ?? [];
      const job = jobs.find((j) => (j.client_request_id ?? '').includes(key));
      assert.ok(job, `no job with request id ${key} in \`expertmesh jobs\`: ${JSON.stringify(jobs).slice(0, 500)}`);
      last = job.state;
      if (last === 'JOB_STATE_CANCELLED') {
        assert.ok(Number(job.generated_tokens) < expect.long_max_tokens, 'the job ran to the end');
        return;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.fail(`job ${key} is ${last}, not CANCELLED, 10 s after the client disconnected`);
  },

  // The cluster is not serving (coordinator up, workers not yet): 503 (the SDK's InternalServerError).
  async not_serving() {
    const health = await fetch(`${args.base}/health`);
    assert.equal(health.status, 503, 'GET /health while not serving');
    for (const call of [
      () => client.chat.completions.create({ model: expect.model, messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 }),
      () => client.completions.create({ model: expect.model, prompt: 'hi', max_tokens: 2 }),
    ]) {
      let err = null;
      try {
        await call();
      } catch (e) {
        err = e;
      }
      assert.ok(err instanceof OpenAI.APIError && err.status === 503,
                `want 503 while not serving, got ${err ? `${err.status} ${err.message}` : 'success'}`);
      assert.ok(err.error?.message, 'no error.message in the 503 body');
    }
  },

  async health() {
    const h = await fetch(`${args.base}/health`);
    assert.equal(h.status, 200, 'GET /health while serving');
  },

  // Coordinator SIGKILL mid-stream (test_openai_sdk.py kills and restarts it when this prints `KILL-ME`):
  // the client retries with the same Idempotency-Key and must get the whole completion, identical to the
  // uninterrupted one.
  async retry_after_restart() {
    const g = G();
    const key = args['request-id'];
    const body = { model: expect.model, messages: g.messages, max_tokens: expect.restart_max_tokens, temperature: 0,
                   stream: true };
    let text = '';
    let killed = false;
    try {
      const s = await client.chat.completions.create(body, { headers: { 'Idempotency-Key': key } });
      for await (const chunk of s) {
        text += chunk.choices[0]?.delta?.content ?? '';
        if (!killed && text.length > 0) {
          killed = true;
          console.log('KILL-ME');
        }
      }
      assert.fail('the stream finished although the coordinator was killed mid-way');
    } catch (e) {
      if (e instanceof assert.AssertionError) throw e;
      assert.ok(killed, `the stream failed before any text: ${e}`);
    }
    // Retry the same request (same Idempotency-Key) until the restarted coordinator answers: the same job,
    // the whole completion from its first token.
    const deadline = Date.now() + 90_000;
    for (let attempt = 1; ; ++attempt) {
      try {
        const s = await client.chat.completions.create(body, { headers: { 'Idempotency-Key': key } });
        const out = await collectChat(s);
        assert.equal(out.text[0], expect.restart_text, `retry ${attempt}: the completion != the uninterrupted one`);
        assert.ok(out.text[0].startsWith(text), 'the retry does not continue what was streamed before the kill');
        assert.equal(out.finish[0], 'length');
        console.log(`retry ${attempt} got the whole completion (${out.text[0].length} chars; ${text.length} before the kill)`);
        break;
      } catch (e) {
        if (e instanceof assert.AssertionError) throw e;
        if (Date.now() > deadline) throw new Error(`no answer 90 s after the kill: ${e}`);
        await new Promise((r) => setTimeout(r, 300));
      }
    }
  },
};

const names = args.case === 'all'
  ? ['models', 'health', 'chat_greedy', 'chat_stream', 'completions', 'n_choices', 'stop_strings', 'bad_requests',
     'cancel_by_disconnect']
  : args.case.split(',');
for (const name of names) {
  const t0 = Date.now();
  try {
    if (!cases[name]) throw new Error(`no case ${name}`);
    await cases[name]();
  } catch (e) {
    console.log(`FAIL ${name}: ${e?.stack ?? e}`);
    process.exit(1);
  }
  console.log(`ok ${name} (${Date.now() - t0} ms)`);
}
