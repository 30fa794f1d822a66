/**
 * Text <-> ids with the exported `tokenizer.json`, through Hugging Face's own JS port of
 * `tokenizers` (@huggingface/tokenizers), and chat prompts through @huggingface/jinja, the Jinja
 * subset transformers' chat templates are written for. Parity with the Python `tokenizers`
 * ids is tested in CI on ASCII, accents, emoji, CJK and whitespace runs.
 */

import { Template } from '@huggingface/jinja';
import { Tokenizer } from '@huggingface/tokenizers';

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant';
  content: string;
}

export class DemoTokenizer {
  private readonly tok: Tokenizer;
  private readonly template: Template | null;
  private readonly specials: Record<string, string>;

  constructor(tokenizerJson: string, tokenizerConfigJson: string, chatTemplate?: string | null) {
    let json: object;
    let config: Record<string, unknown>;
    try {
      json = JSON.parse(tokenizerJson);
      config = JSON.parse(tokenizerConfigJson);
    } catch (e) {
      throw new Error(`tokenizer.json or tokenizer_config.json is not valid JSON (${(e as Error).message}); re-export the model`);
    }
    this.tok = new Tokenizer(json, config);
    const source = chatTemplate ?? (typeof config.chat_template === 'string' ? config.chat_template : null);
    this.template = source ? new Template(source) : null;
    this.specials = {};
    for (const key of ['bos_token', 'eos_token', 'pad_token', 'unk_token']) {
      const v = config[key];
      const text = typeof v === 'string' ? v : v && typeof v === 'object' ? (v as { content?: string }).content : undefined;
      if (text) this.specials[key] = text;
    }
  }

  encode(text: string, addSpecialTokens = true): number[] {
    return this.tok.encode(text, { add_special_tokens: addSpecialTokens }).ids;
  }

  decode(ids: number[], skipSpecialTokens = true): string {
    return this.tok.decode(ids, { skip_special_tokens: skipSpecialTokens });
  }

  get hasChatTemplate(): boolean {
    return this.template !== null;
  }

  /** The chat prompt as transformers' `apply_chat_template(..., add_generation_prompt=True)` builds it. */
  chatPrompt(messages: ChatMessage[]): number[] {
    if (!this.template) throw new Error('this model has no chat template; send a plain prompt');
    const text = this.template.render({ messages, add_generation_prompt: true, ...this.specials });
    return this.encode(text, false);
  }
}

/**
 * Turns streamed ids into text pieces. A byte-level BPE token can hold part of a UTF-8
 * character (emoji, CJK): text is only released once it no longer ends in U+FFFD.
 */
export class TextStream {
  private ids: number[] = [];
  private emitted = 0;

  constructor(private readonly tokenizer: DemoTokenizer) {}

  push(id: number): string {
    this.ids.push(id);
    const text = this.tokenizer.decode(this.ids);
    if (text.endsWith('\uFFFD')) return '';
    const piece = text.slice(this.emitted);
    this.emitted = text.length;
    return piece;
  }

  flush(): string {
    const text = this.tokenizer.decode(this.ids);
    const piece = text.slice(this.emitted);
    this.emitted = text.length;
    return piece;
  }
}
