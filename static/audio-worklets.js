// AudioWorklet processors for the voice agent page (loaded with audioWorklet.addModule).
//
// capture: microphone at the AudioContext's rate -> 16 kHz mono PCM16 frames of 20 ms (320 samples),
//          posted to the page with their RMS level. Resampling is a windowed-sinc low-pass (cut-off
//          7.2 kHz) evaluated at each 16 kHz output instant, so 44.1 and 48 kHz inputs both work.
// player:  16 kHz reply audio -> the AudioContext's rate, through a jitter buffer: playback starts
//          once `prebufferMs` are queued (or the reply has ended) and pauses to rebuffer on underrun.
//          Reports how much of the current reply has been played, and flushes on demand.

const TARGET_RATE = 16000;

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / TARGET_RATE; // input samples per output sample
    this.cutoff = (0.45 * TARGET_RATE) / sampleRate; // cycles per input sample
    this.halfWidth = Math.ceil(8 * Math.max(1, this.ratio)); // kernel half-width in input samples
    this.history = new Float32Array(1 << 14); // ring of recent input samples
    this.received = 0; // input samples seen
    this.nextOut = 0; // position of the next output sample, in input samples
    this.frame = new Int16Array(320);
    this.frameLen = 0;
    this.sumSquares = 0;
  }

  kernel(d) {
    // windowed sinc low-pass at `cutoff`, Hann window over [-halfWidth, halfWidth]
    const x = 2 * this.cutoff * d;
    const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
    const w = 0.5 + 0.5 * Math.cos((Math.PI * d) / (this.halfWidth + 1));
    return 2 * this.cutoff * sinc * w;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    const n = input[0].length;
    const mask = this.history.length - 1;
    for (let i = 0; i < n; i++) {
      let s = 0;
      for (let c = 0; c < input.length; c++) s += input[c][i];
      this.history[(this.received + i) & mask] = s / input.length;
    }
    this.received += n;
    while (this.nextOut + this.halfWidth < this.received) {
      const center = Math.floor(this.nextOut);
      let acc = 0;
      for (let k = center - this.halfWidth + 1; k <= center + this.halfWidth; k++) {
        if (k < 0) continue;
        acc += this.history[k & mask] * this.kernel(this.nextOut - k);
      }
      this.push(acc);
      this.nextOut += this.ratio;
    }
    return true;
  }

  push(sample) {
    const s = Math.max(-1, Math.min(1, sample));
    this.sumSquares += s * s;
    this.frame[this.frameLen++] = s < 0 ? s * 32768 : s * 32767;
    if (this.frameLen === this.frame.length) {
      const rms = Math.sqrt(this.sumSquares / this.frame.length);
      const out = this.frame.slice().buffer;
      this.port.postMessage({ frame: out, rms }, [out]);
      this.frameLen = 0;
      this.sumSquares = 0;
    }
  }
}

class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.prebuffer = Math.round(((opts.prebufferMs || 60) * TARGET_RATE) / 1000);
    this.ring = new Float32Array(TARGET_RATE * 64); // 64 s of 16 kHz audio
    this.step = TARGET_RATE / sampleRate; // 16 kHz samples per output sample
    this.reset(0);
    this.port.onmessage = (e) => this.onMessage(e.data);
    this.blocks = 0;
  }

  reset(id) {
    this.id = id;
    this.written = 0; // 16 kHz samples queued for this reply
    this.readPos = 0; // fractional read position (16 kHz samples)
    this.playing = false;
    this.ended = false;
    this.underruns = 0;
    this.startedAt = null;
  }

  onMessage(msg) {
    if (msg.type === 'start') {
      this.reset(msg.id);
    } else if (msg.type === 'audio') {
      if (msg.id !== this.id) return; // stale audio of an older reply
      const s = msg.samples;
      const n = this.ring.length;
      for (let i = 0; i < s.length; i++) this.ring[(this.written + i) % n] = s[i];
      this.written += s.length;
    } else if (msg.type === 'end') {
      if (msg.id === this.id) this.ended = true;
    } else if (msg.type === 'flush') {
      const played = Math.floor(this.readPos);
      this.port.postMessage({ type: 'flushed', id: this.id, played });
      this.reset(0);
    }
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    const n = this.ring.length;
    const available = () => this.written - this.readPos;
    if (!this.playing && this.written > 0 && (available() >= this.prebuffer || (this.ended && available() > 0))) {
      this.playing = true;
      if (this.startedAt === null) {
        this.startedAt = currentTime;
        this.port.postMessage({ type: 'started', id: this.id });
      }
    }
    for (let i = 0; i < out.length; i++) {
      if (this.playing && available() > 1) {
        const p = this.readPos;
        const i0 = Math.floor(p);
        const frac = p - i0;
        out[i] = this.ring[i0 % n] * (1 - frac) + this.ring[(i0 + 1) % n] * frac;
        this.readPos += this.step;
      } else {
        out[i] = 0;
        if (this.playing && !this.ended) {
          this.playing = false; // underrun: wait for the jitter buffer to fill again
          this.underruns++;
        } else if (this.playing && this.ended) {
          this.readPos = this.written;
          this.playing = false;
          this.port.postMessage({ type: 'drained', id: this.id, played: this.written, underruns: this.underruns });
        }
      }
    }
    if (++this.blocks % 30 === 0 && this.id) {
      this.port.postMessage({ type: 'played', id: this.id, played: Math.floor(this.readPos), buffered: available() });
    }
    return true;
  }
}

registerProcessor('capture', CaptureProcessor);
registerProcessor('player', PlayerProcessor);
