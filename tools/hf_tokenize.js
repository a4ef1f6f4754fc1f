#!/usr/bin/env node
// The reference for expertmesh's C++ tokenizer: HF `tokenizers` (Rust, through
// the npm native binding @anush008/tokenizers, installed by
// scripts/install-deps.sh into tools/node_modules).
//
//   node tools/hf_tokenize.js encode DIR < lines.jsonl   # {"text": s} -> {"tokens": [...]} or {"error": ...}
//   node tools/hf_tokenize.js decode DIR < lines.jsonl   # {"tokens": [...]} -> {"text": s}
//   node tools/hf_tokenize.js bench DIR CORPUS CHUNK_BYTES SECONDS   # prints {"mb_per_s": x, "tokens": n}
//
// encode never adds special tokens (the C++ side adds BOS per add_bos_token).
'use strict';
const fs = require('fs');
const path = require('path');
const readline = require('readline');

function loadTokenizers() {
  try {
    return require(path.join(__dirname, 'node_modules', '@anush008', 'tokenizers'));
  } catch (e) {
    process.stderr.write(`hf_tokenize: cannot load @anush008/tokenizers from tools/node_modules (${e.message}); ` +
                         'run scripts/install-deps.sh\n');
    process.exit(3);
  }
}

function chunks(buf, size) {
  // Byte-exact twin of the C++ bench's chunking: cut after the first '\n' at or past `size` bytes.
  const out = [];
  let i = 0;
  while (i < buf.length) {
    let j = Math.min(buf.length, i + size);
    if (j < buf.length) {
      const nl = buf.indexOf(10, j);
      j = nl < 0 ? buf.length : nl + 1;
    }
    out.push(buf.subarray(i, j).toString('utf8'));
    i = j;
  }
  return out;
}

async function main() {
  const [mode, dir, ...rest] = process.argv.slice(2);
  if (!mode || !dir) {
    process.stderr.write('usage: hf_tokenize.js encode|decode|bench DIR [...]\n');
    process.exit(2);
  }
  const { Tokenizer } = loadTokenizers();
  const tok = Tokenizer.fromFile(path.join(dir, 'tokenizer.json'));
  if (mode === 'bench') {
    const [corpus, chunkBytes, seconds] = rest;
    const buf = fs.readFileSync(corpus);
    const bytes = buf.length;
    const parts = chunks(buf, Number(chunkBytes || 16384));
    const minSeconds = Number(seconds || 2);
    let best = 0, bestCpu = 0, tokens = 0;
    const start = process.hrtime.bigint();
    for (let rep = 0; ; ++rep) {
      const t0 = process.hrtime.bigint();
      const c0 = process.cpuUsage();  // all threads: the encode runs on a libuv worker
      tokens = 0;
      for (const p of parts) tokens += (await tok.encode(p, null, { addSpecialTokens: false })).getIds().length;
      const s = Number(process.hrtime.bigint() - t0) / 1e9;
      const c = process.cpuUsage(c0);
      best = Math.max(best, bytes / s / 1e6);
      bestCpu = Math.max(bestCpu, bytes / ((c.user + c.system) / 1e6) / 1e6);
      if (rep >= 1 && Number(process.hrtime.bigint() - start) / 1e9 >= minSeconds) break;
    }
    process.stdout.write(JSON.stringify({ mb_per_s: best, mb_per_cpu_s: bestCpu, tokens }) + '\n');
    return;
  }
  const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const line of rl) {
    if (!line.trim()) continue;
    const req = JSON.parse(line);
    let res;
    try {
      if (mode === 'encode') {
        res = { tokens: (await tok.encode(req.text, null, { addSpecialTokens: false })).getIds() };
      } else if (mode === 'decode') {
        res = { text: await tok.decode(req.tokens, !!req.skip_special) };
      } else {
        throw new Error(`unknown mode ${mode}`);
      }
    } catch (e) {
      res = { error: String(e.message || e) };
    }
    process.stdout.write(JSON.stringify(res) + '\n');
  }
}

main().catch((e) => {
  process.stderr.write(`hf_tokenize: ${e.stack || e}\n`);
  process.exit(1);
});
