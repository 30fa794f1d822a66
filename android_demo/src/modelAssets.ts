/**
 * Getting the exported model out of the APK: onnxruntime needs a file path (or one big buffer,
 * which would double the memory of a 250-650 MB model in JS), so model.ort is copied once from
 * the app's assets to its files folder; the small JSON/Jinja files are read straight from assets.
 * `npm run put-model -- DIR` puts an `edgelm export --mobile` folder into the assets.
 */

import RNFS from 'react-native-fs';

export const ASSET_DIR = 'model';
export const MODEL_FILE = 'model.ort';

export interface ModelFiles {
  modelPath: string;
  manifest: string;
  tokenizer: string;
  tokenizerConfig: string;
  chatTemplate: string | null;
}

async function readAsset(name: string): Promise<string> {
  const path = `${ASSET_DIR}/${name}`;
  if (!(await RNFS.existsAssets(path))) {
    throw new Error(`assets/${path} is missing: run \`npm run put-model -- EXPORT_DIR\` and rebuild the app`);
  }
  return RNFS.readFileAssets(path, 'utf8');
}

export async function loadModelFiles(onProgress: (message: string) => void): Promise<ModelFiles> {
  const manifest = await readAsset('edgelm.json');
  const modelPath = `${RNFS.DocumentDirectoryPath}/${MODEL_FILE}`;
  const stamp = `${modelPath}.manifest`;
  // Re-copy when the bundled model changed (its manifest differs from the one saved with the copy).
  const fresh = (await RNFS.exists(modelPath)) && (await RNFS.exists(stamp)) && (await RNFS.readFile(stamp, 'utf8')) === manifest;
  if (!fresh) {
    if (!(await RNFS.existsAssets(`${ASSET_DIR}/${MODEL_FILE}`))) {
      throw new Error(`assets/${ASSET_DIR}/${MODEL_FILE} is missing: export with --mobile, then npm run put-model`);
    }
    onProgress('Copying model.ort out of the APK (first start only)...');
    const partial = `${modelPath}.partial`;
    await RNFS.copyFileAssets(`${ASSET_DIR}/${MODEL_FILE}`, partial);
    if (await RNFS.exists(modelPath)) await RNFS.unlink(modelPath);
    await RNFS.moveFile(partial, modelPath);
    await RNFS.writeFile(stamp, manifest, 'utf8');
  }
  const hasTemplate = await RNFS.existsAssets(`${ASSET_DIR}/chat_template.jinja`);
  return {
    modelPath,
    manifest,
    tokenizer: await readAsset('tokenizer.json'),
    tokenizerConfig: await readAsset('tokenizer_config.json'),
    chatTemplate: hasTemplate ? await readAsset('chat_template.jinja') : null,
  };
}
