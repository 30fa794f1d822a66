/** Loads an exported folder in Node (onnxruntime-node): what the app does from its assets, for CI and benchmarks. */

import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

import * as ort from 'onnxruntime-node';

import { DemoTokenizer, Generator, parseManifest } from '../src/core';

export interface LoadedModel {
  generator: Generator;
  tokenizer: DemoTokenizer;
}

export async function loadModel(dir: string, modelFile = 'model.ort', threads = 0): Promise<LoadedModel> {
  const need = (name: string) => {
    const path = join(dir, name);
    if (!existsSync(path)) throw new Error(`${path} is missing; export with \`edgelm export SOURCE ${dir} --mobile\``);
    return path;
  };
  const read = (name: string) => readFileSync(need(name), 'utf8');
  const manifest = parseManifest(read('edgelm.json'));
  const template = existsSync(join(dir, 'chat_template.jinja')) ? read('chat_template.jinja') : null;
  const tokenizer = new DemoTokenizer(read('tokenizer.json'), read('tokenizer_config.json'), template);
  const session = await ort.InferenceSession.create(need(modelFile), {
    executionProviders: ['cpu'],
    intraOpNumThreads: threads,
    graphOptimizationLevel: 'all',
  });
  return { generator: new Generator(session, manifest), tokenizer };
}
