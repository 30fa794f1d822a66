/**
 * Runs the demo's generation core on an exported folder under onnxruntime-node and prints JSON.
 *
 *   npx tsx tools/core-cli.ts MODEL_DIR CASES.json [--model-file model.ort] [--threads N]
 *
 * CASES.json: {"tokenize": [strings], "generate": [{"prompt", "chat"?, "max_new_tokens", "do_sample"?,
 * "temperature"?, "top_k"?, "top_p"?, "seed"?}]}. Output: {"tokenize": [[ids]], "decode": [texts],
 * "generate": [{"ids", "text", "stats"}]}. The Python tests compare it with `tokenizers` and edgelm's runtime.
 */

import { readFileSync } from 'node:fs';

import { TextStream } from '../src/core';
import { loadModel } from './load-node';

interface GenerateCase {
  prompt: string;
  chat?: boolean;
  max_new_tokens: number;
  do_sample?: boolean;
  temperature?: number;
  top_k?: number;
  top_p?: number;
  seed?: number;
}

function option(args: string[], name: string, fallback: string): string {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
}

async function main(args: string[]): Promise<void> {
  if (args.length < 2 || args.includes('--help')) {
    console.log('usage: tsx tools/core-cli.ts MODEL_DIR CASES.json [--model-file model.ort] [--threads N]');
    process.exit(args.includes('--help') ? 0 : 2);
  }
  const [dir, casesPath] = args;
  const cases = JSON.parse(readFileSync(casesPath, 'utf8')) as { tokenize?: string[]; generate?: GenerateCase[] };
  const { generator, tokenizer } = await loadModel(dir, option(args, '--model-file', 'model.ort'),
    Number(option(args, '--threads', '0')));
  const tokenize = (cases.tokenize ?? []).map((s) => tokenizer.encode(s));
  const decode = tokenize.map((ids) => tokenizer.decode(ids, false));
  const generate = [];
  for (const c of cases.generate ?? []) {
    const prompt = c.chat ? tokenizer.chatPrompt([{ role: 'user', content: c.prompt }]) : tokenizer.encode(c.prompt);
    const stream = new TextStream(tokenizer);
    const ids: number[] = [];
    let text = '';
    for await (const id of generator.generate(prompt, {
      maxNewTokens: c.max_new_tokens, doSample: c.do_sample ?? false, temperature: c.temperature,
      topK: c.top_k, topP: c.top_p, seed: c.seed,
    })) {
      ids.push(id);
      text += stream.push(id);
    }
    text += stream.flush();
    generate.push({ prompt_ids: prompt, ids, text, stats: generator.lastStats });
  }
  process.stdout.write(JSON.stringify({ tokenize, decode, generate }) + '\n');
}

main(process.argv.slice(2)).catch((e: Error) => {
  process.stderr.write(`demo core: error: ${e.message}\n`);
  process.exit(1);
});
