/**
 * The demo screen: pick a provider, type a prompt, choose greedy or sampling, watch the text
 * stream with tokens/s. All generation logic lives in ./core (tested in CI under Node);
 * this file is only UI and the onnxruntime-react-native session.
 */

import React, { useCallback, useEffect, useRef, useState } from 'react';
import {
  ActivityIndicator, Pressable, SafeAreaView, ScrollView, StyleSheet, Switch, Text, TextInput, View,
} from 'react-native';
import { InferenceSession } from 'onnxruntime-react-native';

import { DemoTokenizer, Generator, parseManifest, TextStream } from './core';
import { loadModelFiles } from './modelAssets';

type Provider = 'cpu' | 'xnnpack' | 'nnapi';
const PROVIDERS: Provider[] = ['xnnpack', 'cpu', 'nnapi'];

interface Loaded {
  generator: Generator;
  tokenizer: DemoTokenizer;
  provider: Provider;
}

async function load(provider: Provider, onProgress: (m: string) => void): Promise<Loaded> {
  const files = await loadModelFiles(onProgress);
  onProgress(`Creating the ${provider} session...`);
  const manifest = parseManifest(files.manifest);
  // NNAPI compiles fixed shapes only: it takes the graph when the model was exported with
  // --static-shapes; the CPU provider runs whatever it leaves. XNNPACK wants its own threads.
  const executionProviders = provider === 'nnapi'
    ? [{ name: 'nnapi', useFP16: false }, 'cpu']
    : provider === 'xnnpack' ? ['xnnpack', 'cpu'] : ['cpu'];
  const session = await InferenceSession.create(files.modelPath, {
    executionProviders,
    graphOptimizationLevel: 'all',
    intraOpNumThreads: provider === 'xnnpack' ? 1 : 0,
  });
  const tokenizer = new DemoTokenizer(files.tokenizer, files.tokenizerConfig, files.chatTemplate);
  return { generator: new Generator(session, manifest), tokenizer, provider };
}

export default function App(): React.JSX.Element {
  const [provider, setProvider] = useState<Provider>('xnnpack');
  const [model, setModel] = useState<Loaded | null>(null);
  const [status, setStatus] = useState('Loading the model...');
  const [prompt, setPrompt] = useState('Give me a short poem about the sea.');
  const [chat, setChat] = useState(true);
  const [doSample, setDoSample] = useState(false);
  const [temperature, setTemperature] = useState('0.7');
  const [topP, setTopP] = useState('0.9');
  const [maxNewTokens, setMaxNewTokens] = useState('128');
  const [output, setOutput] = useState('');
  const [running, setRunning] = useState(false);
  const stop = useRef(false);

  useEffect(() => {
    let cancelled = false;
    setModel(null);
    load(provider, (m) => !cancelled && setStatus(m))
      .then((m) => {
        if (!cancelled) {
          setModel(m);
          setStatus(`Ready (${provider}).`);
        }
      })
      .catch((e: Error) => !cancelled && setStatus(`Could not load the model: ${e.message}`));
    return () => {
      cancelled = true;
    };
  }, [provider]);

  const generate = useCallback(async () => {
    if (!model) return;
    stop.current = false;
    setRunning(true);
    setOutput('');
    try {
      const ids = chat && model.tokenizer.hasChatTemplate
        ? model.tokenizer.chatPrompt([{ role: 'user', content: prompt }])
        : model.tokenizer.encode(prompt);
      const stream = new TextStream(model.tokenizer);
      let text = '';
      for await (const id of model.generator.generate(ids, {
        maxNewTokens: Number.parseInt(maxNewTokens, 10),
        doSample,
        temperature: doSample ? Number.parseFloat(temperature) : undefined,
        topP: doSample ? Number.parseFloat(topP) : undefined,
        shouldContinue: () => !stop.current,
      })) {
        text += stream.push(id);
        setOutput(text);
      }
      setOutput(text + stream.flush());
      const s = model.generator.lastStats;
      if (s) {
        setStatus(`${s.newTokens} tokens, ${s.decodeTokensPerSecond.toFixed(1)} tokens/s, first token after ` +
          `${s.timeToFirstTokenMs.toFixed(0)} ms (${s.promptTokens}-token prompt, ${model.provider})`);
      }
    } catch (e) {
      setStatus(`Error: ${(e as Error).message}`);
    } finally {
      setRunning(false);
    }
  }, [model, chat, prompt, doSample, temperature, topP, maxNewTokens]);

  return (
    <SafeAreaView style={styles.screen}>
      <ScrollView contentContainerStyle={styles.body} keyboardShouldPersistTaps="handled">
        <Text style={styles.title}>edgelm on-device demo</Text>
        <View style={styles.row}>
          {PROVIDERS.map((p) => (
            <Pressable key={p} disabled={running} onPress={() => setProvider(p)}
              style={[styles.chip, p === provider && styles.chipOn]}>
              <Text style={p === provider ? styles.chipTextOn : undefined}>{p}</Text>
            </Pressable>
          ))}
        </View>
        <TextInput style={styles.prompt} multiline value={prompt} onChangeText={setPrompt} placeholder="Prompt" />
        <View style={styles.row}>
          <Text>Chat template</Text>
          <Switch value={chat} onValueChange={setChat} />
          <Text>Sampling</Text>
          <Switch value={doSample} onValueChange={setDoSample} />
        </View>
        {doSample && (
          <View style={styles.row}>
            <Text>temperature</Text>
            <TextInput style={styles.number} keyboardType="decimal-pad" value={temperature} onChangeText={setTemperature} />
            <Text>top-p</Text>
            <TextInput style={styles.number} keyboardType="decimal-pad" value={topP} onChangeText={setTopP} />
          </View>
        )}
        <View style={styles.row}>
          <Text>max new tokens</Text>
          <TextInput style={styles.number} keyboardType="number-pad" value={maxNewTokens} onChangeText={setMaxNewTokens} />
        </View>
        <Pressable style={styles.button} disabled={!model}
          onPress={() => (running ? (stop.current = true) : generate())}>
          <Text style={styles.buttonText}>{running ? 'Stop' : 'Generate'}</Text>
        </Pressable>
        <Text style={styles.status}>{status}</Text>
        {!model && !status.startsWith('Could not') && <ActivityIndicator />}
        <Text selectable style={styles.output}>{output}</Text>
      </ScrollView>
    </SafeAreaView>
  );
}

const styles = StyleSheet.create({
  screen: { flex: 1, backgroundColor: '#fafafa' },
  body: { padding: 16, gap: 12 },
  title: { fontSize: 20, fontWeight: '600' },
  row: { flexDirection: 'row', alignItems: 'center', gap: 8, flexWrap: 'wrap' },
  chip: { paddingHorizontal: 12, paddingVertical: 6, borderRadius: 16, borderWidth: 1, borderColor: '#888' },
  chipOn: { backgroundColor: '#1f6feb', borderColor: '#1f6feb' },
  chipTextOn: { color: 'white' },
  prompt: { minHeight: 80, borderWidth: 1, borderColor: '#ccc', borderRadius: 8, padding: 8, textAlignVertical: 'top' },
  number: { width: 64, borderWidth: 1, borderColor: '#ccc', borderRadius: 6, paddingHorizontal: 6, paddingVertical: 2 },
  button: { backgroundColor: '#1f6feb', borderRadius: 8, padding: 12, alignItems: 'center' },
  buttonText: { color: 'white', fontWeight: '600' },
  status: { color: '#555' },
  output: { fontSize: 16, lineHeight: 22 },
});
