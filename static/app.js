// Telugu voice agent page: microphone -> 16 kHz PCM16 over one WebSocket -> reply audio through a
// jitter buffer. No build step, no dependencies. Protocol: see streaming_server_advanced.py / README.
//
// URL parameters: ?test=1 (browser tests: echo cancellation, noise suppression and AGC off, the
// microphone starts by itself, state exposed as window.agentState), &session=<id>.
'use strict';

const params = new URLSearchParams(location.search);
const TEST = params.get('test') === '1';
const RATE = 16000;
const FRAME = 320; // 20 ms at 16 kHz

const state = {
  connection: 'connecting', // connecting | connected | reconnecting | closed
  sessionId: params.get('session') || sessionStorage.getItem('agentSession') || newSessionId(),
  untrained: false,
  micStarted: false,
  sentFrames: 0,
  level: -100,
  events: [], // event types received, in order
  latencies: [], // latency events, newest last
  errors: [],
  responseId: 0, // reply being played (0: none)
  receivedSamples: 0,
  playedSamples: 0,
  playbackStarted: 0, // replies whose audio reached the speakers
  reconnects: 0,
  context: [],
  agentText: null, // the words the current reply's model wrote before speaking (null: none)
};
if (TEST) window.agentState = state;
sessionStorage.setItem('agentSession', state.sessionId);

const $ = (id) => document.getElementById(id);
let ws = null;
let audioCtx = null;
let player = null;
let capture = null;
let micStream = null;
let sendingSample = false;
let lastPlaybackReport = 0;
let retryDelay = 500;
let settingsTimer = null;
let inUseErrors = 0;
let idleClosed = false; // the server closed us for inactivity: reconnect on the next button press only

function newSessionId() {
  const bytes = new Uint8Array(6);
  crypto.getRandomValues(bytes);
  return 'web-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

// ---------------------------------------------------------------------------------------------
// UI

function setConnection(s, detail) {
  state.connection = s;
  const el = $('conn');
  el.textContent = detail ? `${s} (${detail})` : s;
  el.className = 'pill ' + s;
}

function logEvent(text, cls) {
  const li = document.createElement('li');
  li.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  if (cls) li.className = cls;
  const log = $('log');
  log.prepend(li);
  while (log.children.length > 40) log.lastChild.remove();
}

function showLatency(ev) {
  state.latencies.push(ev);
  $('latency').textContent = `${Math.round(ev.latency_ms)} ms`;
  $('latency-mode').textContent = `${ev.mode} mode, reply ${ev.response_id}`;
  const b = ev.breakdown || {};
  const row = document.createElement('tr');
  const cells = [ev.response_id, ev.mode, Math.round(ev.latency_ms), b.end_of_turn_wait_ms, b.processing_ms,
    b.queue_ms, b.codec_encode_ms, b.s2s_encode_ms, b.s2s_generate_ms, b.codec_decode_ms];
  for (const c of cells) {
    const td = document.createElement('td');
    td.textContent = c === undefined ? '–' : typeof c === 'number' ? String(Math.round(c * 10) / 10) : c;
    row.appendChild(td);
  }
  const body = $('history');
  body.prepend(row);
  while (body.children.length > 8) body.lastChild.remove();
  const recent = state.latencies.slice(-8).map((e) => e.latency_ms);
  const sorted = [...recent].sort((a, b) => a - b);
  $('latency-stats').textContent =
    `last ${recent.length}: median ${Math.round(sorted[Math.floor(sorted.length / 2)])} ms, ` +
    `best ${Math.round(sorted[0])} ms, worst ${Math.round(sorted[sorted.length - 1])} ms`;
}

function showLevel(rms) {
  const db = rms > 0 ? 20 * Math.log10(rms) : -100;
  state.level = db;
  const pct = Math.max(0, Math.min(100, ((db + 70) / 70) * 100));
  $('level-bar').style.width = pct + '%';
  $('level-db').textContent = db > -99 ? `${Math.round(db)} dBFS` : 'silence';
}

function showAgent(speaking) {
  $('agent').textContent = speaking ? 'agent speaking' : 'agent listening';
  $('agent').className = 'pill ' + (speaking ? 'speaking' : 'listening');
}

function fillSelect(el, items, value) {
  el.innerHTML = '';
  for (const item of items) {
    const o = document.createElement('option');
    o.value = o.textContent = item;
    el.appendChild(o);
  }
  if (value) el.value = value;
}

function currentSettings() {
  return {
    voice: $('voice').value, emotion: $('emotion').value, mode: $('mode').value,
    pitch: Number($('pitch').value), energy: Number($('energy').value), rate: Number($('rate').value),
    accent: Number($('accent').value),
  };
}

function sendSettings() {
  clearTimeout(settingsTimer);
  settingsTimer = setTimeout(() => send(JSON.stringify({ type: 'session', ...currentSettings() })), 120);
}

for (const id of ['pitch', 'energy', 'rate', 'accent']) {
  $(id).addEventListener('input', () => {
    $(id + '-value').textContent = $(id).value;
    sendSettings();
  });
}
for (const id of ['voice', 'emotion', 'mode']) $(id).addEventListener('change', sendSettings);

// ---------------------------------------------------------------------------------------------
// Connection

function reconnectIfIdle() {
  if (idleClosed) {
    idleClosed = false;
    setConnection('connecting');
    connect();
  }
}

function send(data) {
  if (ws && ws.readyState === WebSocket.OPEN) {
    ws.send(data);
    return true;
  }
  return false;
}

function connect() {
  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws/${state.sessionId}`;
  ws = new WebSocket(url);
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => {
    retryDelay = 500;
    setConnection('connected');
  };
  ws.onmessage = (e) => (typeof e.data === 'string' ? onEvent(JSON.parse(e.data)) : onAudio(e.data));
  ws.onclose = () => {
    stopPlayback();
    if (idleClosed) {
      setConnection('closed', 'idle: press a button to reconnect');
      return;
    }
    state.reconnects++;
    setConnection('reconnecting', `retry in ${(retryDelay / 1000).toFixed(1)} s`);
    setTimeout(connect, retryDelay);
    retryDelay = Math.min(5000, retryDelay * 2);
  };
}

function onEvent(ev) {
  state.events.push(ev.type);
  switch (ev.type) {
    case 'session_created':
      state.untrained = ev.untrained;
      $('untrained').hidden = !ev.untrained;
      fillSelect($('voice'), ev.voices, $('voice').value || ev.settings.voice);
      fillSelect($('emotion'), ev.emotions, $('emotion').value || ev.settings.emotion);
      send(JSON.stringify({ type: 'session', ...currentSettings() }));
      logEvent(`session ${ev.session_id}${ev.resumed ? ' (conversation resumed)' : ''}`);
      break;
    case 'session_updated':
      break;
    case 'speech_started':
      $('user').className = 'pill speaking';
      $('user').textContent = 'you are speaking';
      logEvent(ev.barge_in ? 'you interrupted the agent' : 'speech started');
      break;
    case 'speech_stopped':
      $('user').className = 'pill';
      $('user').textContent = 'you are silent';
      logEvent(`speech stopped (${ev.duration_ms} ms)`);
      break;
    case 'response_started':
      state.responseId = ev.response_id;
      player && player.port.postMessage({ type: 'start', id: ev.response_id });
      showAgent(true);
      state.agentText = ev.text ?? null;
      $('agent-words').textContent = ev.text ?? '(this model speaks without writing words first)';
      logEvent(`reply ${ev.response_id} started (${ev.voice}, ${ev.emotion})${ev.text ? ': ' + ev.text : ''}`);
      break;
    case 'response_done':
      player && player.port.postMessage({ type: 'end', id: ev.response_id });
      logEvent(`reply ${ev.response_id} done: ${(ev.audio_ms / 1000).toFixed(2)} s`);
      break;
    case 'interrupted':
      logEvent(`reply ${ev.response_id} interrupted (${ev.reason})`, 'warn');
      stopPlayback();
      break;
    case 'latency':
      showLatency(ev);
      logEvent(`latency ${Math.round(ev.latency_ms)} ms (${ev.mode})`);
      break;
    case 'context':
      state.context = ev.turns;
      $('memory').textContent = ev.turns.length
        ? ev.turns.map((t) => `${t.role === 'user' ? 'you' : 'agent'} ${(t.ms / 1000).toFixed(1)} s${t.interrupted ? ' (cut)' : ''}`).join(' · ')
        : 'empty';
      break;
    case 'error':
      state.errors.push(ev);
      logEvent(`error ${ev.code}: ${ev.message}`, 'error');
      if (ev.code === 'session_in_use' && ++inUseErrors >= 3) {
        state.sessionId = newSessionId(); // the old connection has not timed out yet: start afresh
        sessionStorage.setItem('agentSession', state.sessionId);
      }
      if (ev.code === 'bad_session_id') state.sessionId = newSessionId();
      if (ev.code === 'idle_timeout') idleClosed = true;
      break;
    default:
      break;
  }
}

function onAudio(buf) {
  const view = new DataView(buf);
  const id = view.getUint32(0, true);
  if (id !== state.responseId || !player) return; // audio of an interrupted or older reply
  const pcm = new Int16Array(buf, 8);
  const samples = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
  state.receivedSamples += samples.length;
  player.port.postMessage({ type: 'audio', id, samples }, [samples.buffer]);
}

function reportPlayback(id, played, force) {
  const now = performance.now();
  if (!id || (!force && now - lastPlaybackReport < 200)) return;
  lastPlaybackReport = now;
  send(JSON.stringify({ type: 'playback', response_id: id, played_ms: Math.round((played / RATE) * 1000) }));
}

function stopPlayback() {
  if (player) player.port.postMessage({ type: 'flush' }); // answered by 'flushed' with what was played
  state.responseId = 0;
  showAgent(false);
}

// ---------------------------------------------------------------------------------------------
// Audio

async function ensureAudio() {
  if (audioCtx) return;
  audioCtx = new AudioContext({ latencyHint: 'interactive' });
  await audioCtx.audioWorklet.addModule('/static/audio-worklets.js');
  player = new AudioWorkletNode(audioCtx, 'player', { outputChannelCount: [1], processorOptions: { prebufferMs: 60 } });
  player.connect(audioCtx.destination);
  player.port.onmessage = (e) => {
    const m = e.data;
    if (m.type === 'played') {
      state.playedSamples = Math.max(state.playedSamples, m.played);
      reportPlayback(m.id, m.played, false);
    } else if (m.type === 'started') {
      state.playbackStarted++;
    } else if (m.type === 'flushed' || m.type === 'drained') {
      state.playedSamples = Math.max(state.playedSamples, m.played);
      reportPlayback(m.id, m.played, true);
      if (m.type === 'drained') showAgent(false);
    }
  };
  $('ctx-rate').textContent = `${audioCtx.sampleRate} Hz`;
}

async function startMic() {
  await ensureAudio();
  await audioCtx.resume();
  const constraints = { channelCount: 1, echoCancellation: !TEST, noiseSuppression: !TEST, autoGainControl: !TEST };
  micStream = await navigator.mediaDevices.getUserMedia({ audio: constraints });
  const source = audioCtx.createMediaStreamSource(micStream);
  capture = new AudioWorkletNode(audioCtx, 'capture');
  capture.port.onmessage = (e) => {
    showLevel(e.data.rms);
    if (!sendingSample && send(e.data.frame)) state.sentFrames++;
  };
  const mute = audioCtx.createGain();
  mute.gain.value = 0; // the graph must reach the destination for the worklet to run
  source.connect(capture).connect(mute).connect(audioCtx.destination);
  state.micStarted = true;
  $('mic').textContent = 'Stop microphone';
  logEvent(`microphone on (${audioCtx.sampleRate} Hz -> 16 kHz)`);
}

function stopMic() {
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  if (capture) capture.disconnect();
  micStream = capture = null;
  state.micStarted = false;
  $('mic').textContent = 'Start microphone';
  showLevel(0);
}

$('mic').addEventListener('click', async () => {
  reconnectIfIdle();
  try {
    if (state.micStarted) stopMic();
    else await startMic();
  } catch (err) {
    logEvent(`microphone unavailable: ${err.message} (the page needs localhost or HTTPS)`, 'error');
  }
});
$('cancel').addEventListener('click', () => send(JSON.stringify({ type: 'cancel' })));
$('clear').addEventListener('click', () => send(JSON.stringify({ type: 'clear_context' })));

// ---------------------------------------------------------------------------------------------
// Sample questions: pre-rendered Telugu speech, streamed in real time as if spoken

async function loadSamples() {
  let index = [];
  try {
    const r = await fetch('/static/samples/index.json', { cache: 'no-cache' });
    if (r.ok) index = await r.json();
  } catch (_) { /* no samples rendered */ }
  const box = $('samples');
  if (!index.length) {
    box.textContent = 'No sample questions rendered (python streaming_server_advanced.py --build_samples).';
    return;
  }
  for (const item of index) {
    const b = document.createElement('button');
    b.textContent = item.text;
    b.title = `${item.category}, ${item.duration_s} s`;
    b.addEventListener('click', () => sendSample(item, b).catch((err) => {
      sendingSample = false;
      b.classList.remove('active');
      logEvent(`could not send the sample: ${err}`, 'error');
    }));
    box.appendChild(b);
  }
}

async function sendSample(item, button) {
  if (sendingSample) return;
  reconnectIfIdle();
  for (let i = 0; i < 50 && !(ws && ws.readyState === WebSocket.OPEN); i++) await new Promise((r) => setTimeout(r, 100));
  await ensureAudio();
  await audioCtx.resume();
  const data = await (await fetch(`/static/samples/${item.file}`)).arrayBuffer();
  const local = await audioCtx.decodeAudioData(data.slice(0)); // decoding detaches its buffer: copy first
  const decoded = await new OfflineAudioContext(1, 1, RATE).decodeAudioData(data); // resampled to 16 kHz
  const audio = decoded.getChannelData(0);
  const tail = state.micStarted ? 0 : Math.round(0.6 * RATE); // silence ends the turn without a mic
  const total = new Float32Array(audio.length + tail);
  total.set(audio);
  sendingSample = true;
  button.classList.add('active');
  const src = audioCtx.createBufferSource(); // let the user hear the question
  src.buffer = local;
  src.connect(audioCtx.destination);
  src.start();
  const t0 = performance.now();
  for (let off = 0; off < total.length; off += FRAME) {
    const frame = new Int16Array(Math.min(FRAME, total.length - off));
    for (let i = 0; i < frame.length; i++) {
      const s = Math.max(-1, Math.min(1, total[off + i]));
      frame[i] = s < 0 ? s * 32768 : s * 32767;
    }
    send(frame.buffer);
    const due = t0 + ((off + FRAME) / RATE) * 1000;
    await new Promise((r) => setTimeout(r, Math.max(0, due - performance.now())));
  }
  sendingSample = false;
  button.classList.remove('active');
}

// ---------------------------------------------------------------------------------------------

$('session-id').textContent = state.sessionId;
setConnection('connecting');
showAgent(false);
connect();
loadSamples();
if (TEST) {
  document.body.classList.add('test');
  startMic().catch((err) => {
    state.errors.push({ code: 'mic', message: String(err) });
    logEvent(`microphone unavailable: ${err}`, 'error');
  });
}
