// llama.cpp (the prebuilt library of node-llama-cpp, pinned in package.json) on a
// GGUF written by `expertmesh checkpoint --gguf`: the peer of `expertmesh bench peer`.
//
//   node tools/llama_peer.mjs --model M.gguf --prompts P.jsonl --threads 2 --new-tokens 64 [--kv f16|f32]
//                             [--dump-probs FILE]
//
// Prompts are JSON lines {"tokens": [ids...]} (the format of `expertmesh generate`);
// all of them run at once, one sequence each, in one context (batch = number of
// prompts), greedy (temperature 0), exactly --new-tokens tokens each (end-of-text
// tokens do not stop it). Prints one JSON object on stdout:
//   {init_s, load_s, prefill_s, prefill_tok_s, decode_s, decode_tok_s, ttft_s, wall_s,
//    prompt_tokens, generated_tokens, peak_rss_bytes, tokens: [[ids...] per prompt]}
// init_s: getLlama (loading the addon, testing the prebuilt binary in a child process);
// load_s: the model and the context; prefill: from submitting the prompts to the first token of every sequence;
// decode: the rest; ttft_s: process start to the last sequence's first token.
// --dump-probs FILE: also write {"probs": [[p(token) for every vocabulary id] per prompt]},
// llama.cpp's softmax before each prompt's first new token (slower: for checks only).
// Exit 3 with "SKIP: ..." on stderr when node-llama-cpp or its prebuilt binary is absent.
import fs from "node:fs";

function arg(name, def) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : def;
}
const modelPath = arg("model");
const promptsPath = arg("prompts");
const threads = Number(arg("threads", "2"));
const newTokens = Number(arg("new-tokens", "64"));
const kv = arg("kv", "f16");
const dumpProbs = arg("dump-probs", "");  // file: the softmax over the vocabulary before each first new token
if (!modelPath || !promptsPath || !(threads > 0) || !(newTokens >= 1) || !["f16", "f32"].includes(kv)) {
  console.error("usage: node llama_peer.mjs --model M.gguf --prompts P.jsonl [--threads N] [--new-tokens N>=1] " +
                "[--kv f16|f32]");
  process.exit(2);
}
const prompts = fs.readFileSync(promptsPath, "utf8").split("\n").filter((l) => l.trim())
    .map((l, i) => {
      const j = JSON.parse(l);
      if (!Array.isArray(j.tokens) || j.tokens.length === 0) throw new Error(`${promptsPath}:${i + 1}: no tokens`);
      return j.tokens;
    });

let nlc;
try {
  nlc = await import("node-llama-cpp");
} catch (e) {
  console.error(`SKIP: node-llama-cpp is not installed (scripts/install-deps.sh): ${e.message}`);
  process.exit(3);
}
const now = () => Number(process.hrtime.bigint()) / 1e9;
const up0 = process.uptime();  // seconds since the process started
const t0 = now();
let llama;
try {
  llama = await nlc.getLlama({
    gpu: false, build: "never", usePrebuiltBinaries: true, skipDownload: true, progressLogs: false,
    logLevel: "error", maxThreads: threads,
  });
} catch (e) {
  console.error(`SKIP: node-llama-cpp's prebuilt binary for this machine is absent: ${e.message}`);
  process.exit(3);
}
const tInit = now();  // getLlama: node-llama-cpp loads its addon and tests the prebuilt binary in a child process
const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
const maxLen = Math.max(...prompts.map((p) => p.length)) + newTokens;
const ctxOpts = {
  contextSize: Math.max(256, Math.ceil(maxLen / 256) * 256), sequences: prompts.length, threads,
  batchSize: Math.max(512, prompts.reduce((a, p) => a + p.length, 0)),
};
if (kv === "f32") {
  ctxOpts.experimentalKvCacheKeyType = "F32";
  ctxOpts.experimentalKvCacheValueType = "F32";
}
const context = await model.createContext(ctxOpts);
const seqs = prompts.map(() => context.getSequence());
const t1 = now();

const firsts = [];
const probs = prompts.map(() => null);
const out = await Promise.all(prompts.map(async (p, i) => {
  const toks = [];
  const gen = dumpProbs
    ? seqs[i].evaluateWithMetadata(p, { probabilities: true }, { temperature: 0 })
    : seqs[i].evaluate(p, { temperature: 0 });
  for await (const o of gen) {
    if (toks.length === 0) {
      firsts.push(now());
      if (dumpProbs) {
        const v = new Array(o.probabilities.size).fill(0);  // every vocabulary id has an entry
        for (const [tok, pr] of o.probabilities) v[tok] = pr;
        probs[i] = v;
      }
    }
    toks.push(dumpProbs ? o.token : o);
    if (toks.length >= newTokens) break;
  }
  return toks;
}));
const t2 = now();
const firstAll = Math.max(...firsts);
const status = fs.readFileSync("/proc/self/status", "utf8");
const hwm = /VmHWM:\s+(\d+) kB/.exec(status);
const promptTokens = prompts.reduce((a, p) => a + p.length, 0);
const generated = out.reduce((a, t) => a + t.length, 0);
const prefill = firstAll - t1, decode = t2 - firstAll;
console.log(JSON.stringify({
  init_s: tInit - t0, load_s: t1 - tInit, prefill_s: prefill, prefill_tok_s: promptTokens / prefill, decode_s: decode,
  // tokens made by decode steps: each sequence's first token comes from the prefill
  decode_tok_s: (generated - prompts.length) / decode, ttft_s: up0 + firstAll - t0,
  wall_s: process.uptime(), prompt_tokens: promptTokens, generated_tokens: generated, threads, kv,
  peak_rss_bytes: hwm ? Number(hwm[1]) * 1024 : null, tokens: out,
}));
if (dumpProbs) fs.writeFileSync(dumpProbs, JSON.stringify({ probs }));
await context.dispose();
await model.dispose();
await llama.dispose();
