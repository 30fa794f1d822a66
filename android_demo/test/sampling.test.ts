import assert from 'node:assert/strict';
import { test } from 'node:test';

import { argmax, candidates, checkSampling, parseManifest, sample, seededRandom } from '../src/core';

function randomLogits(n: number, seed: number, scale = 3): Float32Array {
  const r = seededRandom(seed);
  return Float32Array.from({ length: n }, () => (r() - 0.5) * 2 * scale);
}

/** transformers' rule by brute force: full sort, softmax, top-k mask, then top-p on the renormalised rest. */
function reference(logits: Float32Array, t: number, k: number, p: number): number[] {
  const order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a] || a - b);
  let kept = k > 0 ? order.slice(0, k) : order;
  const max = logits[kept[0]];
  const w = kept.map((i) => Math.exp((logits[i] - max) / t));
  const total = w.reduce((a, b) => a + b, 0);
  if (p < 1) {
    let before = 0;
    const out: number[] = [];
    for (let j = 0; j < kept.length; j++) {
      if (before / total >= p && out.length > 0) break;
      out.push(kept[j]);
      before += w[j];
    }
    kept = out;
  }
  return kept;
}

test('argmax picks the first maximum', () => {
  assert.equal(argmax(Float32Array.from([1, 5, 3, 5])), 1);
});

test('top-k and top-p keep what transformers keeps', () => {
  for (let seed = 1; seed <= 40; seed++) {
    const logits = randomLogits(seed % 2 ? 500 : 49152, seed, seed % 3 === 0 ? 12 : 3);
    for (const [t, k, p] of [[1, 0, 0.9], [0.7, 50, 1], [1.3, 20, 0.5], [1, 0, 0.3], [0.5, 5, 0.95]] as const) {
      const got = candidates(logits, { doSample: true, temperature: t, topK: k, topP: p });
      assert.deepEqual(got.ids, reference(logits, t, k, p), `seed ${seed} t ${t} k ${k} p ${p}`);
      assert.ok(Math.abs(got.probs.reduce((a, b) => a + b, 0) - 1) < 1e-9);
    }
  }
});

test('draws follow the kept distribution (chi-square)', () => {
  const logits = Float32Array.from([2, 1.5, 1, 0.2, -1, -3]);
  const opts = { doSample: true, temperature: 0.9, topP: 0.9 };
  const { ids, probs } = candidates(logits, opts);
  const counts = new Map<number, number>();
  const random = seededRandom(7);
  const n = 20000;
  for (let i = 0; i < n; i++) {
    const id = sample(logits, opts, random);
    counts.set(id, (counts.get(id) ?? 0) + 1);
  }
  assert.deepEqual([...counts.keys()].sort(), [...ids].sort(), 'only kept tokens are drawn');
  const chi2 = ids.reduce((s, id, j) => s + ((counts.get(id) ?? 0) - n * probs[j]) ** 2 / (n * probs[j]), 0);
  assert.ok(chi2 < 20, `chi-square ${chi2} with ${ids.length - 1} degrees of freedom`);
});

test('a seed reproduces the draws; greedy ignores it', () => {
  const logits = randomLogits(1000, 3);
  const draw = (seed: number) => {
    const r = seededRandom(seed);
    return Array.from({ length: 20 }, () => sample(logits, { doSample: true, topK: 50 }, r));
  };
  assert.deepEqual(draw(5), draw(5));
  assert.notDeepEqual(draw(5), draw(6));
  assert.equal(sample(logits, { doSample: false }, seededRandom(1)), argmax(logits));
});

test('bad settings and manifests are named', () => {
  assert.throws(() => checkSampling({ doSample: true, temperature: 0 }), /temperature must be > 0/);
  assert.throws(() => checkSampling({ doSample: true, topP: 1.5 }), /top-p must be in/);
  assert.throws(() => checkSampling({ doSample: true, topK: -1 }), /top-k/);
  assert.throws(() => parseManifest('{'), /not valid JSON/);
  assert.throws(() => parseManifest('{"format_version": 99}'), /newer edgelm/);
  assert.throws(() => parseManifest('{"format_version": 1, "task": "masked-lm"}'), /causal LM/);
  assert.throws(() => parseManifest('{"format_version": 1, "task": "causal-lm", "num_layers": "x"}'), /num_layers/);
});
