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

function chunks(text, size) {
  // Split at line ends near `size` bytes (characters here; the corpus is ASCII-dominated).
  const out = [];
  let i = 0;
  while (i < text.length) {
    let j = Math.min(text.length, i + size);
    if (j < text.length) {
      const nl = text.indexOf('\n', j);
      j = nl < 0 ? text.length : nl + 1;
    }
    out.push(text.slice(i, j));
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
    const text = fs.readFileSync(corpus, 'utf8');
    const bytes = Buffer.byteLength(text, 'utf8');
    const parts = chunks(text, Number(chunkBytes || 16384));
    const minSeconds = Number(seconds || 2);
    let best = 0, tokens = 0;
    const start = process.hrtime.bigint();
    for (let rep = 0; ; ++rep) {
      const t0 = process.hrtime.bigint();
      tokens = 0;
      for (const p of parts) tokens += (await tok.encode(p, null, { addSpecialTokens: false })).getIds().length;
      const s = Number(process.hrtime.bigint() - t0) / 1e9;
      best = Math.max(best, bytes / s / 1e6);
      if (rep >= 1 && Number(process.hrtime.bigint() - start) / 1e9 >= minSeconds) break;
    }
    process.stdout.write(JSON.stringify({ mb_per_s: best, tokens }) + '\n');
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
