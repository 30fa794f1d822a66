/**
 * The `edgelm.json` manifest written by `edgelm export`: the demo reads the cache layout and the
 * special tokens from it instead of guessing them from the graph, exactly like the Python runtime.
 */

export interface Manifest {
  task: string;
  modelType: string;
  numLayers: number;
  numKeyValueHeads: number;
  headDim: number;
  vocabSize: number;
  eosTokenIds: number[];
  padTokenId: number | null;
  maxPositions: number | null;
  /** Set for `--static-shapes` exports: the fixed KV buffer length. */
  staticMaxLength: number | null;
  inputs: string[];
  outputs: string[];
}

/** The manifest format versions this demo understands (edgelm's FORMAT_VERSION). */
export const FORMAT_VERSION = 1;

function int(data: Record<string, unknown>, key: string): number {
  const v = data[key];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) {
    throw new Error(`edgelm.json: "${key}" must be a non-negative integer, got ${JSON.stringify(v)}; re-export the model`);
  }
  return v;
}

export function parseManifest(text: string): Manifest {
  let data: Record<string, unknown>;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new Error(`edgelm.json is not valid JSON (${(e as Error).message}); re-export the model`);
  }
  const version = data.format_version;
  if (typeof version !== 'number' || version > FORMAT_VERSION) {
    throw new Error(`the model was exported by a newer edgelm (manifest format ${version}); update the demo`);
  }
  if (data.task !== 'causal-lm') {
    throw new Error(`the demo generates text with a causal LM; this model is a ${String(data.task)}`);
  }
  const eos = data.eos_token_id;
  const nullableInt = (key: string) => (data[key] === null || data[key] === undefined ? null : int(data, key));
  return {
    task: 'causal-lm',
    modelType: String(data.model_type ?? ''),
    numLayers: int(data, 'num_layers'),
    numKeyValueHeads: int(data, 'num_key_value_heads'),
    headDim: int(data, 'head_dim'),
    vocabSize: int(data, 'vocab_size'),
    eosTokenIds: Array.isArray(eos) ? eos.map(Number) : typeof eos === 'number' ? [eos] : [],
    padTokenId: nullableInt('pad_token_id'),
    maxPositions: nullableInt('max_position_embeddings'),
    staticMaxLength: nullableInt('static_max_length'),
    inputs: (data.inputs as string[]) ?? [],
    outputs: (data.outputs as string[]) ?? [],
  };
}
