export { Generator, type GenerateOptions, type GenerationStats } from './generator';
export { parseManifest, type Manifest } from './manifest';
export { argmax, candidates, checkSampling, sample, seededRandom, type SamplingOptions } from './sampling';
export { DemoTokenizer, TextStream, type ChatMessage } from './tokenizer';
