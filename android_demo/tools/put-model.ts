/**
 * Copies an `edgelm export --mobile` folder into the app's assets (android/app/src/main/assets/model/).
 *
 *   npm run put-model -- EXPORT_DIR
 */

import { copyFileSync, existsSync, mkdirSync, readdirSync, renameSync, rmSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';

const FILES = ['model.ort', 'edgelm.json', 'tokenizer.json', 'tokenizer_config.json'];
const OPTIONAL = ['chat_template.jinja'];

function main(args: string[]): void {
  if (args.length !== 1 || args[0] === '--help') {
    console.log('usage: npm run put-model -- EXPORT_DIR   (a folder made by `edgelm export SOURCE DIR --mobile`)');
    process.exit(args[0] === '--help' ? 0 : 2);
  }
  const src = resolve(args[0]);
  const missing = FILES.filter((f) => !existsSync(join(src, f)));
  if (missing.length) {
    console.error(`put-model: ${src} lacks ${missing.join(', ')}; export it with \`edgelm export SOURCE ${args[0]} --mobile\``);
    process.exit(2);
  }
  const assets = resolve(__dirname, '..', 'android', 'app', 'src', 'main', 'assets');
  const dst = join(assets, 'model');
  const tmp = join(assets, '.model-tmp');
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  for (const f of [...FILES, ...OPTIONAL.filter((o) => existsSync(join(src, o)))]) copyFileSync(join(src, f), join(tmp, f));
  rmSync(dst, { recursive: true, force: true });
  renameSync(tmp, dst);
  const mb = statSync(join(dst, 'model.ort')).size / 1e6;
  console.log(`put-model: ${readdirSync(dst).join(', ')} -> ${dst} (model.ort ${mb.toFixed(0)} MB)`);
}

main(process.argv.slice(2));
