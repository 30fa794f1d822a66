/**
 * The KV-cache generation loop over an `edgelm export` graph, written against onnxruntime-common
 * only, so the same code runs in the app (onnxruntime-react-native) and in CI (onnxruntime-node).
 *
 * Dynamic graphs: the prompt goes in one call, then one token per call; each step's
 * `present.N.*` tensors are fed back as the next `past_key_values.N.*`. Static-shape graphs
 * (`--static-shapes`, for NNAPI/CoreML): one token per call into a fixed buffer, with
 * `cache_position` naming the slot and an attention mask over the whole buffer.
 */

import { Tensor } from 'onnxruntime-common';
import type { InferenceSession } from 'onnxruntime-common';

import type { Manifest } from './manifest';
import { checkSampling, sample, seededRandom, type SamplingOptions } from './sampling';

export interface GenerateOptions extends SamplingOptions {
  maxNewTokens: number;
  seed?: number;
  /** Called after each step; return false to stop (the Stop button). */
  shouldContinue?: () => boolean;
}

export interface GenerationStats {
  promptTokens: number;
  newTokens: number;
  /** Prompt processing plus the first token, in milliseconds. */
  timeToFirstTokenMs: number;
  /** Tokens after the first, per second of decoding. */
  decodeTokensPerSecond: number;
}

type Feeds = Record<string, Tensor>;

const clock = (globalThis as { performance?: { now(): number } }).performance;
const now = (): number => (clock ? clock.now() : Date.now());

function int64(values: number[], dims: number[]): Tensor {
  return new Tensor('int64', BigInt64Array.from(values.map((v) => BigInt(v))), dims);
}

export class Generator {
  readonly pastNames: string[];
  /** The export takes `logits_to_keep` (edgelm exports since it was added): the prefill then asks for
   * the last position's logits only instead of the LM head over the whole prompt. */
  readonly keepsLogits: boolean;
  lastStats: GenerationStats | null = null;

  constructor(private readonly session: InferenceSession, readonly manifest: Manifest) {
    const inputs = new Set(session.inputNames);
    this.pastNames = [];
    for (let i = 0; i < manifest.numLayers; i++) {
      this.pastNames.push(`past_key_values.${i}.key`, `past_key_values.${i}.value`);
    }
    const missing = ['input_ids', 'attention_mask', ...this.pastNames].filter((n) => !inputs.has(n));
    if (missing.length) {
      throw new Error(`the model graph lacks ${missing.slice(0, 3).join(', ')}: it does not match edgelm.json; re-export it`);
    }
    this.keepsLogits = manifest.staticMaxLength === null && manifest.inputs.includes('logits_to_keep');
    if (manifest.staticMaxLength !== null && !inputs.has('cache_position')) {
      throw new Error('edgelm.json says static shapes but the graph has no cache_position input; re-export it');
    }
  }

  private get presentNames(): string[] {
    return this.pastNames.map((n) => n.replace('past_key_values.', 'present.'));
  }

  private emptyCache(length: number): Feeds {
    const { numKeyValueHeads: h, headDim: d } = this.manifest;
    const cache: Feeds = {};
    for (const name of this.pastNames) cache[name] = new Tensor('float32', new Float32Array(h * length * d), [1, h, length, d]);
    return cache;
  }

  private lastLogits(logits: Tensor): Float32Array {
    const vocab = logits.dims[logits.dims.length - 1];
    const data = logits.data as Float32Array;
    return data.subarray(data.length - vocab);
  }

  private async run(feeds: Feeds): Promise<{ logits: Float32Array; cache: Feeds }> {
    const out = await this.session.run(feeds, ['logits', ...this.presentNames]);
    const cache: Feeds = {};
    this.pastNames.forEach((name, i) => (cache[name] = out[this.presentNames[i]] as Tensor));
    return { logits: this.lastLogits(out.logits as Tensor), cache };
  }

  /** Yields generated token ids one by one (EOS included when it ends the text). */
  async *generate(promptIds: number[], opts: GenerateOptions): AsyncGenerator<number> {
    if (!promptIds.length) throw new Error('the prompt is empty: give at least one token');
    if (!(Number.isInteger(opts.maxNewTokens) && opts.maxNewTokens > 0)) {
      throw new Error(`maxNewTokens must be a positive integer, got ${opts.maxNewTokens}`);
    }
    if (opts.doSample) checkSampling(opts);
    const { maxPositions, staticMaxLength, vocabSize } = this.manifest;
    const limit = Math.min(maxPositions ?? Infinity, staticMaxLength ?? Infinity);
    if (promptIds.length >= limit) {
      throw new Error(`the prompt has ${promptIds.length} tokens but the model takes ${limit}; shorten it`);
    }
    const bad = promptIds.find((t) => !Number.isInteger(t) || t < 0 || t >= vocabSize);
    if (bad !== undefined) throw new Error(`token id ${bad} is outside the vocabulary (0..${vocabSize - 1})`);
    const maxNew = Math.min(opts.maxNewTokens, limit - promptIds.length);
    const random = seededRandom(opts.seed ?? Date.now());
    const eos = new Set(this.manifest.eosTokenIds);
    const start = now();
    let firstAt = start;
    let produced = 0;
    let logits: Float32Array;
    let cache: Feeds;
    let step: (token: number, position: number) => Promise<void>;

    if (staticMaxLength !== null) {
      const mask = new BigInt64Array(staticMaxLength);
      cache = this.emptyCache(staticMaxLength);
      step = async (token, position) => {
        mask[position] = 1n;
        const r = await this.run({
          input_ids: int64([token], [1, 1]),
          attention_mask: new Tensor('int64', mask, [1, staticMaxLength]),
          position_ids: int64([position], [1, 1]),
          cache_position: int64([position], [1]),
          ...cache,
        });
        logits = r.logits;
        cache = r.cache;
      };
      for (let i = 0; i < promptIds.length; i++) await step(promptIds[i], i);
    } else {
      const hasPositions = this.session.inputNames.includes('position_ids');
      const first = await this.run({
        input_ids: int64(promptIds, [1, promptIds.length]),
        attention_mask: int64(promptIds.map(() => 1), [1, promptIds.length]),
        ...(hasPositions ? { position_ids: int64(promptIds.map((_, i) => i), [1, promptIds.length]) } : {}),
        ...(this.keepsLogits ? { logits_to_keep: int64([1], [1]) } : {}),
        ...this.emptyCache(0),
      });
      logits = first.logits;
      cache = first.cache;
      step = async (token, position) => {
        const r = await this.run({
          input_ids: int64([token], [1, 1]),
          attention_mask: int64(new Array(position + 1).fill(1), [1, position + 1]),
          ...(hasPositions ? { position_ids: int64([position], [1, 1]) } : {}),
          ...cache,
        });
        logits = r.logits;
        cache = r.cache;
      };
    }
    try {
      for (let position = promptIds.length; produced < maxNew; position++) {
        const token = sample(logits!, opts, random);
        produced++;
        if (produced === 1) firstAt = now();
        yield token;
        if (eos.has(token) || produced >= maxNew || (opts.shouldContinue && !opts.shouldContinue())) break;
        await step(token, position);
      }
    } finally {
      const decodeMs = now() - firstAt;
      this.lastStats = {
        promptTokens: promptIds.length,
        newTokens: produced,
        timeToFirstTokenMs: firstAt - start,
        decodeTokensPerSecond: produced > 1 && decodeMs > 0 ? ((produced - 1) * 1000) / decodeMs : 0,
      };
    }
  }
}
