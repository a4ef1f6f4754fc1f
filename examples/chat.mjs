#!/usr/bin/env node
// Chat with a model served by expertmesh through the official `openai` npm SDK,
// streaming. The coordinator must be started with --http-listen HOST:PORT
// (docs/API.md); the SDK is pinned in tools/package.json and installed into
// tools/node_modules by scripts/install-deps.sh (or `npm install openai`
// beside your own copy of this file).
//
//   node examples/chat.mjs --server 127.0.0.1:8000 "Hello!"
//   node examples/chat.mjs --server 127.0.0.1:8000 --max-tokens 32 --temperature 0.7 "Hi"
//
// $EXPERTMESH_API_KEY is sent as `Authorization: Bearer KEY`.
import { createRequire } from 'node:module';
import { parseArgs } from 'node:util';

async function loadOpenAI() {
  try {
    return (await import('openai')).default;
  } catch {
    // The repository's copy: tools/node_modules (scripts/install-deps.sh).
    const require = createRequire(new URL('../tools/package.json', import.meta.url));
    return (await import(require.resolve('openai'))).default;
  }
}

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    server: { type: 'string' },
    model: { type: 'string' },
    system: { type: 'string' },
    'max-tokens': { type: 'string' },
    temperature: { type: 'string' },
    seed: { type: 'string' },
  },
});
if (!values.server || positionals.length !== 1) {
  console.error('usage: node examples/chat.mjs --server HOST:PORT [--model M] [--system S] [--max-tokens N] ' +
                '[--temperature T] [--seed S] "message"');
  process.exit(2);
}

const OpenAI = await loadOpenAI();
const base = values.server.startsWith('http') ? values.server : `http://${values.server}`;
const client = new OpenAI({
  baseURL: `${base.replace(/\/$/, '')}/v1`,
  apiKey: process.env.EXPERTMESH_API_KEY || 'none',
  maxRetries: 0,
});

try {
  const model = values.model ?? (await client.models.list()).data[0].id;
  const messages = [];
  if (values.system) messages.push({ role: 'system', content: values.system });
  messages.push({ role: 'user', content: positionals[0] });
  const request = { model, messages, stream: true, stream_options: { include_usage: true } };
  if (values['max-tokens']) request.max_tokens = Number(values['max-tokens']);
  if (values.temperature) request.temperature = Number(values.temperature);
  if (values.seed) request.seed = Number(values.seed);
  const stream = await client.chat.completions.create(request);
  let usage = null;
  for await (const chunk of stream) {
    const delta = chunk.choices[0]?.delta;
    if (delta?.content) process.stdout.write(delta.content);
    if (chunk.usage) usage = chunk.usage;
  }
  process.stdout.write('\n');
  if (usage) console.error(`[${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens]`);
} catch (e) {
  console.error(`chat.mjs: ${e instanceof OpenAI.APIError ? `HTTP ${e.status ?? '-'}: ${e.message}` : e}`);
  process.exit(1);
}
