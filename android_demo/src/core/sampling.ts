/**
 * Next-token choice over one row of logits: greedy, or transformers' sampling warpers in
 * transformers' order (temperature, then top-k, then top-p), then a draw.
 *
 * Top-k and top-p only sort the candidates that can matter (the weights above a threshold that
 * drops until enough mass or enough tokens are in), so a peaked distribution costs two passes
 * over the vocabulary instead of a full sort of 49k entries.
 */

export interface SamplingOptions {
  doSample: boolean;
  temperature?: number;
  topK?: number;
  topP?: number;
}

/** A seeded generator (mulberry32): reproducible draws on every JS engine. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function argmax(logits: Float32Array): number {
  let best = 0;
  let bestValue = logits[0];
  for (let i = 1; i < logits.length; i++) {
    if (logits[i] > bestValue) {
      bestValue = logits[i];
      best = i;
    }
  }
  return best;
}

export function checkSampling(opts: SamplingOptions): void {
  const { temperature, topK, topP } = opts;
  if (temperature !== undefined && !(temperature > 0)) {
    throw new Error(`temperature must be > 0, got ${temperature}; use greedy decoding for temperature 0`);
  }
  if (topK !== undefined && !(Number.isInteger(topK) && topK >= 0)) {
    throw new Error(`top-k must be a non-negative integer, got ${topK}`);
  }
  if (topP !== undefined && !(topP > 0 && topP <= 1)) {
    throw new Error(`top-p must be in (0, 1], got ${topP}`);
  }
}

/**
 * The largest weights, most likely first, until `enough` says the prefix suffices.
 * Only weights above a threshold are sorted; the threshold drops tenfold until `enough` holds.
 */
function largest(weights: Float64Array, enough: (ids: number[]) => boolean): number[] {
  const n = weights.length;
  for (let threshold = 1e-3; ; threshold /= 10) {
    const ids: number[] = [];
    for (let i = 0; i < n; i++) if (weights[i] >= threshold) ids.push(i);
    ids.sort((a, b) => weights[b] - weights[a] || a - b);
    if (ids.length === n || enough(ids) || threshold < 1e-300) return ids;
  }
}

/**
 * The token ids that survive top-k then top-p, most likely first, with their probabilities
 * renormalised over the survivors. Exposed for tests: the draw itself is `sample`.
 */
export function candidates(logits: Float32Array, opts: SamplingOptions): { ids: number[]; probs: number[] } {
  const temperature = opts.temperature ?? 1;
  const n = logits.length;
  let max = -Infinity;
  for (let i = 0; i < n; i++) if (logits[i] > max) max = logits[i];
  const weights = new Float64Array(n); // exp((l - max) / T): the largest is 1
  let total = 0;
  for (let i = 0; i < n; i++) {
    weights[i] = Math.exp((logits[i] - max) / temperature);
    total += weights[i];
  }
  const k = opts.topK && opts.topK > 0 ? Math.min(opts.topK, n) : n;
  const p = opts.topP ?? 1;
  const sum = (ids: number[]) => ids.reduce((s, i) => s + weights[i], 0);
  let ids: number[];
  let pool: number;
  if (k < n) {
    ids = largest(weights, (c) => c.length >= k).slice(0, k);
    pool = sum(ids);
  } else {
    ids = largest(weights, (c) => p < 1 && sum(c) >= p * total);
    pool = total;
  }
  if (p < 1) {
    // transformers keeps a token when the tokens more likely than it hold less than p of the mass:
    // the shortest most-likely-first prefix whose mass reaches p (at least one token).
    let mass = 0;
    let keep = 0;
    while (keep < ids.length) {
      mass += weights[ids[keep]];
      keep++;
      if (mass / pool >= p) break;
    }
    ids = ids.slice(0, Math.max(1, keep));
  }
  const kept = sum(ids);
  return { ids, probs: ids.map((i) => weights[i] / kept) };
}

export function sample(logits: Float32Array, opts: SamplingOptions, random: () => number): number {
  if (!opts.doSample) return argmax(logits);
  const { ids, probs } = candidates(logits, opts);
  let u = random();
  for (let j = 0; j < ids.length; j++) {
    u -= probs[j];
    if (u < 0) return ids[j];
  }
  return ids[ids.length - 1];
}
