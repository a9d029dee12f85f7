// attnflow's interactive explanation page. Hand-written, no libraries, no network: everything it shows
// comes from the JSON block #attnflow-data and the compressed binary block it names (see _payload.py for
// the encodings). Runs in any browser with DecompressionStream (Chrome/Edge 80+, Firefox 113+, Safari 16.4+).
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("attnflow-data").textContent);
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, text) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    if (text !== undefined) node.textContent = text;
    return node;
  };
  let BYTES = null;
  const CACHE = new Map();
  const depth = Math.max(...DATA.methods.map((m) => Math.max(...m.layers))) + 1;
  const state = {
    item: 0, method: DATA.methods[0].name, layer: depth - 1, source: 0, exclude: false, shared: true,
    log: false, heads: [], headLayer: 0, mapStream: null, onlySource: true,
  };

  async function inflate(text) {
    const binary = atob(text);
    const raw = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) raw[i] = binary.charCodeAt(i);
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser has no DecompressionStream; open the page in a current Chrome, Edge, Firefox or Safari");
    }
    const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  // One stored array as a Float64Array (row-major, its descriptor's shape).
  function decode(desc) {
    if (CACHE.has(desc)) return CACHE.get(desc);
    const count = desc.shape.reduce((a, b) => a * b, 1);
    const out = new Float64Array(count);
    const view = new DataView(BYTES.buffer, BYTES.byteOffset, BYTES.byteLength);
    if (desc.enc === "log16") {
      for (let i = 0; i < count; i++) {
        const c = view.getUint16(desc.offset + 2 * i, true);
        out[i] = c === 0 ? 0 : c >= 32769 ? -Math.exp(desc.lo + (c - 32769) * desc.step)
          : Math.exp(desc.lo + (c - 1) * desc.step);
      }
    } else if (desc.enc === "u8row") {
      const cols = desc.shape[desc.shape.length - 1];
      for (let r = 0; r < count / cols; r++) {
        const top = view.getFloat32(desc.max_offset + 4 * r, true);
        for (let j = 0; j < cols; j++) out[r * cols + j] = (BYTES[desc.offset + r * cols + j] / 255) * top;
      }
    } else {
      throw new Error("unknown encoding " + desc.enc);
    }
    CACHE.set(desc, out);
    return out;
  }

  const item = () => DATA.items[state.item];
  const methodInfo = (name) => DATA.methods.find((m) => m.name === name);
  // Where `layer` sits among a method's computed layers (the last one where it was not computed).
  function layerSlot(method, layer) {
    const layers = methodInfo(method).layers;
    const at = layers.indexOf(layer);
    return { slot: at >= 0 ? at : layers.length - 1, exact: at >= 0, shown: layers[at >= 0 ? at : layers.length - 1] };
  }

  // Scores of `method` for explained token `source` over each input stream: {stream: Float64Array}.
  function rowScores(method, source, layer) {
    const it = item();
    const { slot } = layerSlot(method, layer);
    const out = {};
    for (const name of methodInfo(method).inputs) {
      const desc = it.scores[method][name];
      const [, sources, tokens] = desc.shape;
      const all = decode(desc);
      out[name] = all.slice((slot * sources + source) * tokens, (slot * sources + source + 1) * tokens);
    }
    return applyExclusion(out);
  }

  // Special tokens dropped (NaN) and the rest renormalised over every input stream together.
  function applyExclusion(byStream) {
    if (!state.exclude) return byStream;
    let total = 0;
    const out = {};
    for (const [name, values] of Object.entries(byStream)) {
      const special = item().streams[name].special;
      out[name] = values.map((v, j) => (special[j] ? NaN : v));
      out[name].forEach((v) => { if (!Number.isNaN(v)) total += v; });
    }
    if (total !== 0) for (const name of Object.keys(out)) out[name] = out[name].map((v) => v / total);
    return out;
  }

  function scaleMax(rows) {
    let top = 0;
    for (const byStream of rows) for (const values of Object.values(byStream)) for (const v of values) {
      if (Number.isFinite(v) && Math.abs(v) > top) top = Math.abs(v);
    }
    return top || 1;
  }

  // 0..1 level of a value on the page's scale (linear, or log over four decades).
  function level(v, top) {
    if (!Number.isFinite(v) || v <= 0) return 0;
    if (!state.log) return Math.min(v / top, 1);
    return Math.max(0, Math.min(1, 1 + Math.log10(v / top) / 4));
  }
  const heat = (t) => `rgb(${255 - Math.round(t * 40)},${Math.round(255 - t * 215)},${Math.round(255 - t * 220)})`;
  const ink = (t) => (t > 0.6 ? "#fff" : "#111");
  const display = (label, first) => {
    const continued = label.startsWith("##") && label.length > 2;
    const text = (continued ? label.slice(2) : label).replace(/[▁Ġ]/g, "").replace(/Ċ/g, "⏎") || label;
    return { text, space: !first && !continued };
  };
  // Labels with the position added where a text repeats ("the₃"), as the pictures show them.
  const SUB = "₀₁₂₃₄₅₆₇₈₉";
  function positioned(labels, positions) {
    const counts = new Map();
    labels.forEach((l) => counts.set(l, (counts.get(l) || 0) + 1));
    return labels.map((l, i) => (counts.get(l) > 1 ? l + String(positions[i]).replace(/[0-9]/g, (d) => SUB[Number(d)]) : l));
  }
  const hue = (h, heads) => (h * 360) / heads;
  const fmt = (v) => (Number.isFinite(v) ? (Math.abs(v) >= 0.001 || v === 0 ? v.toFixed(4) : v.toExponential(2)) : "–");

  // -- panels -----------------------------------------------------------------------------------------
  function renderStatus() {
    const it = item();
    const position = it.sources[state.source];
    const { shown, exact } = layerSlot(state.method, state.layer);
    $("status").textContent = `Explaining “${it.source_labels[state.source]}” (position ${it.streams[DATA.explained].positions[position]} of ${DATA.explained}) · ${methodInfo(state.method).title} after layer ${shown + 1} of ${depth}` +
      (exact ? "" : ` (computed after layer ${shown + 1} only)`) + (state.exclude ? " · special tokens excluded, renormalised" : "");
    $("layer-value").textContent = `${state.layer + 1} of ${depth}`;
  }

  function renderText() {
    const box = $("text");
    box.replaceChildren();
    const it = item();
    const rows = rowScores(state.method, state.source, state.layer);
    const top = state.shared ? scaleMax(DATA.methods.map((m) => rowScores(m.name, state.source, state.layer))) : scaleMax([rows]);
    const several = Object.keys(rows).length > 1;
    for (const name of DATA.streams) {
      if (!(name in rows)) continue;
      const block = el("p", { class: "tokens", "data-stream": name });
      if (several) block.appendChild(el("span", { class: "stream-name" }, name + ": "));
      const tokens = it.streams[name].tokens;
      tokens.forEach((label, j) => {
        const { text, space } = display(label, j === 0);
        if (space) block.appendChild(document.createTextNode(" "));
        const v = rows[name][j];
        const t = level(v, top);
        const span = el("span", { class: "tok", "data-stream": name, "data-index": String(j),
          "data-score": Number.isFinite(v) ? String(v) : "", title: `${label} (${name} ${it.streams[name].positions[j]}): ${fmt(v)}` }, text);
        if (Number.isFinite(v)) { span.style.background = heat(t); span.style.color = ink(t); } else span.classList.add("excluded");
        if (name === DATA.explained && it.sources[state.source] === j) span.classList.add("source");
        if (name === DATA.explained && it.sources.indexOf(j) < 0) span.classList.add("unexplained");
        block.appendChild(span);
      });
      box.appendChild(block);
    }
    $("scale-note").textContent = `colour: ${state.log ? "log (4 decades)" : "linear"} from 0 to ${fmt(top)}` +
      (state.shared ? " (shared by every method)" : ` (${methodInfo(state.method).title} alone)`);
  }

  function renderCompare() {
    const table = $("compare");
    table.replaceChildren();
    const it = item();
    const rows = DATA.methods.map((m) => rowScores(m.name, state.source, state.layer));
    const top = scaleMax(rows);
    const head = el("tr");
    head.appendChild(el("th", {}, "token"));
    DATA.methods.forEach((m) => {
      const { shown, exact } = layerSlot(m.name, state.layer);
      head.appendChild(el("th", {}, m.title + (exact ? "" : ` (layer ${shown + 1})`)));
    });
    table.appendChild(head);
    for (const name of DATA.streams) {
      if (!rows.some((r) => name in r)) continue;
      it.streams[name].tokens.forEach((label, j) => {
        const tr = el("tr");
        tr.appendChild(el("td", { class: "label" }, (DATA.streams.length > 1 ? name + " · " : "") + label));
        DATA.methods.forEach((m, k) => {
          const v = rows[k][name] ? rows[k][name][j] : NaN;
          const td = el("td", { class: "cell", "data-method": m.name, "data-score": Number.isFinite(v) ? String(v) : "" });
          const bar = el("span", { class: "bar" });
          bar.style.width = `${(100 * level(v, top)).toFixed(1)}%`;
          td.appendChild(bar);
          td.appendChild(el("span", { class: "num" }, fmt(v)));
          tr.appendChild(td);
        });
        table.appendChild(tr);
      });
    }
  }

  const canvas0 = () => $("map");

  function renderMap() {
    const it = item();
    const inputs = methodInfo(state.method).inputs;
    const select = $("map-stream");
    if (!state.mapStream || inputs.indexOf(state.mapStream) < 0) {
      state.mapStream = inputs.find((s) => s !== DATA.explained) || inputs[0];
    }
    select.replaceChildren(...inputs.map((s) => el("option", { value: s }, s)));
    select.value = state.mapStream;
    const name = state.mapStream;
    const cols = it.streams[name].tokens.length;
    const rowsLabels = it.source_labels;
    const streamsNamed = DATA.streams.length > 1;
    let caption = (streamsNamed ? `explained ${DATA.explained} tokens (rows) × input ${name} tokens (columns)`
      : "explained tokens (rows) × input tokens (columns)") + `, ${methodInfo(state.method).title}`;
    if (name !== DATA.explained) caption += ": the encoder-decoder view (what each decoder token draws on in the encoder)";
    else if (DATA.causal && DATA.prompt_length) caption += `: generated × prompt view (the prompt is the first ${DATA.prompt_length} tokens, left of the line)`;
    else if (DATA.causal) caption += ": each token over the tokens before it (causal)";
    $("map-caption").textContent = caption + ". Click a row to explain that token.";
    const left = 90, topPad = 64;
    const room = Math.max(200, (canvas0().parentElement.clientWidth || 640) - left - 30);
    const cell = Math.max(2, Math.min(14, Math.floor(room / Math.max(cols, 1))));
    const canvas = $("map");
    canvas.width = left + cols * cell + 4;
    canvas.height = topPad + rowsLabels.length * cell + 4;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const all = rowsLabels.map((_, s) => rowScores(state.method, s, state.layer)[name]);
    const top = scaleMax(all.map((r) => ({ r })));
    const explainedPositions = it.sources.map((p) => it.streams[DATA.explained].positions[p]);
    const rowNames = positioned(rowsLabels, explainedPositions);
    const colNames = positioned(it.streams[name].tokens, it.streams[name].positions);
    canvas.dataset.columns = JSON.stringify(colNames);
    canvas.dataset.rows = JSON.stringify(rowNames);
    ctx.font = `${Math.max(6, Math.min(cell, 11))}px sans-serif`;
    const every = Math.max(1, Math.ceil(7 / cell));
    all.forEach((values, s) => {
      values.forEach((v, j) => {
        ctx.fillStyle = Number.isFinite(v) ? heat(level(v, top)) : "#ddd";
        ctx.fillRect(left + j * cell, topPad + s * cell, cell, cell);
      });
      if (s % every === 0) {
        ctx.fillStyle = s === state.source ? "#1f4fbf" : "#333";
        ctx.textAlign = "right";
        ctx.fillText(rowNames[s].slice(0, 12), left - 4, topPad + s * cell + cell * 0.8);
      }
    });
    ctx.fillStyle = "#333";
    ctx.textAlign = "left";
    colNames.forEach((label, j) => {  // column labels, rotated, above the columns
      if (j % every !== 0) return;
      ctx.save();
      ctx.translate(left + j * cell + cell * 0.75, topPad - 3);
      ctx.rotate(-Math.PI / 2);
      ctx.fillText(label.slice(0, 10), 0, 0);
      ctx.restore();
    });
    ctx.strokeStyle = "#1f4fbf";
    ctx.strokeRect(left, topPad + state.source * cell, cols * cell, cell);
    if (name === DATA.explained && DATA.causal && DATA.prompt_length) {
      ctx.strokeStyle = "#000";
      ctx.beginPath();
      ctx.moveTo(left + DATA.prompt_length * cell, topPad);
      ctx.lineTo(left + DATA.prompt_length * cell, canvas.height);
      ctx.stroke();
    }
    renderLegend(top);
    const cellAt = (event) => {
      const rect = canvas.getBoundingClientRect();
      const x = (event.clientX - rect.left) * (canvas.width / rect.width);
      const y = (event.clientY - rect.top) * (canvas.height / rect.height);
      return { s: Math.floor((y - topPad) / cell), j: Math.floor((x - left) / cell) };
    };
    canvas.onclick = (event) => {
      const { s } = cellAt(event);
      if (s >= 0 && s < rowsLabels.length) { state.source = s; render(); }
    };
    canvas.onmousemove = (event) => {
      const { s, j } = cellAt(event);
      canvas.title = s >= 0 && s < rowsLabels.length && j >= 0 && j < cols
        ? `${rowNames[s]} → ${colNames[j]}: ${fmt(all[s][j])}` : "";
    };
  }

  // The map's colour legend: the colour ramp from 0 to the largest value shown, and the scale's kind.
  function renderLegend(top) {
    const legend = $("map-legend");
    const bar = $("map-legend-bar");
    const ctx = bar.getContext("2d");
    for (let x = 0; x < bar.width; x++) {
      const t = x / (bar.width - 1);
      ctx.fillStyle = heat(t);
      ctx.fillRect(x, 0, 1, bar.height);
    }
    legend.querySelector(".lo").textContent = state.log ? fmt(top * 1e-4) : "0";
    legend.querySelector(".hi").textContent = fmt(top);
    legend.querySelector(".kind").textContent = state.log ? "log colours (4 decades)" : "linear colours";
    legend.dataset.top = String(top);
  }

  // Every layer × head as a thumbnail (query × key, each row scaled to its largest weight); click to open.
  function renderModel() {
    const box = $("model");
    const it = item();
    if (!it.heads || !DATA.layers) {
      $("model-panel").style.display = "none";
      return;
    }
    if (box.dataset.item !== String(state.item)) {
      box.dataset.item = String(state.item);
      const table = el("table");
      const most = Math.max(...DATA.layers.map((l) => l.heads));
      const head = el("tr");
      head.appendChild(el("th"));
      for (let h = 0; h < most; h++) head.appendChild(el("th", {}, `head ${h}`));
      table.appendChild(head);
      DATA.layers.forEach((layer, k) => {
        const desc = it.heads[k];
        const tr = el("tr");
        tr.appendChild(el("th", {}, `${DATA.streams.length > 1 ? layer.query + " " : ""}L${layer.number}${layer.query !== layer.key ? " (cross)" : ""}`));
        if (desc) {
          const [heads, nq, nk] = desc.shape;
          const weights = decode(desc);
          for (let h = 0; h < heads; h++) {
            const canvas = el("canvas", { class: "thumb", width: String(nk), height: String(nq), "data-layer": String(k),
              "data-head": String(h), title: `${layer.query} L${layer.number} head ${h} (${layer.name})` });
            const ctx = canvas.getContext("2d");
            const image = ctx.createImageData(nk, nq);
            for (let i = 0; i < nq; i++) {
              let top = 0;
              for (let j = 0; j < nk; j++) top = Math.max(top, weights[(h * nq + i) * nk + j]);
              for (let j = 0; j < nk; j++) {
                const t = top > 0 ? weights[(h * nq + i) * nk + j] / top : 0;
                const at = 4 * (i * nk + j);
                image.data[at] = 255 - Math.round(t * 224);
                image.data[at + 1] = 255 - Math.round(t * 176);
                image.data[at + 2] = 255 - Math.round(t * 64);
                image.data[at + 3] = 255;
              }
            }
            ctx.putImageData(image, 0, 0);
            canvas.onclick = () => {
              state.headLayer = k;
              state.heads = [h];
              $("head-layer").value = String(k);
              renderHeads();
              $("heads-panel").scrollIntoView({ block: "nearest" });
            };
            const td = el("td");
            td.appendChild(canvas);
            tr.appendChild(td);
          }
        }
        table.appendChild(tr);
      });
      box.replaceChildren(table);
    }
    box.querySelectorAll("canvas.thumb").forEach((c) => {
      c.classList.toggle("on", Number(c.dataset.layer) === state.headLayer && state.heads.indexOf(Number(c.dataset.head)) >= 0);
    });
  }

  function renderHeads() {
    const box = $("heads-panel");
    const it = item();
    if (!it.heads || !DATA.layers) {
      box.querySelector(".note").textContent = "Per-head weights are not in this page: write it with to_html(trace=...) (attnflow explain --html does).";
      $("heads").style.display = "none";
      return;
    }
    const layer = DATA.layers[state.headLayer];
    const desc = it.heads[state.headLayer];
    const [heads, nq, nk] = desc.shape;
    const weights = decode(desc);
    state.heads = state.heads.filter((h) => h < heads);
    const buttons = $("head-buttons");
    buttons.replaceChildren();
    ["mean"].concat([...Array(heads).keys()]).forEach((h) => {
      const on = h === "mean" ? state.heads.length === 0 : state.heads.indexOf(h) >= 0;
      const button = el("button", { type: "button", class: on ? "on" : "", "data-head": String(h),
        title: h === "mean" ? "the mean of every head" : "click to add or remove this head (several are overlaid, each in its colour)" },
        h === "mean" ? "mean of heads" : `head ${h}`);
      if (h !== "mean") { button.style.borderColor = `hsl(${hue(h, heads)},70%,45%)`; if (on) button.style.background = `hsla(${hue(h, heads)},70%,45%,0.18)`; }
      button.onclick = () => {
        if (h === "mean") state.heads = [];
        else if (state.heads.indexOf(h) >= 0) state.heads = state.heads.filter((x) => x !== h);
        else state.heads = state.heads.concat([h]).sort((a, b) => a - b);
        renderHeads();
      };
      buttons.appendChild(button);
    });
    const queries = it.streams[layer.query].tokens;
    const keys = it.streams[layer.key].tokens;
    const row = 15;
    const canvas = $("heads");
    canvas.style.display = "";
    canvas.width = 560;
    canvas.height = Math.max(nq, nk) * row + 30;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.font = "12px sans-serif";
    const xl = 150, xr = 410;
    const explainedRow = layer.query === DATA.explained ? it.sources[state.source] : -1;
    const mean = state.heads.length === 0;
    const picked = mean ? [...Array(heads).keys()] : state.heads;
    canvas.dataset.heads = mean ? "mean" : state.heads.join(",");
    canvas.dataset.layer = String(state.headLayer);
    for (let i = 0; i < nq; i++) {
      if (state.onlySource && explainedRow >= 0 && i !== explainedRow) continue;
      for (const h of picked) {
        for (let j = 0; j < nk; j++) {
          let w = weights[(h * nq + i) * nk + j];
          if (mean) w /= heads;
          if (w < 0.005) continue;
          ctx.strokeStyle = mean ? `rgba(31,79,191,${Math.min(1, w * heads)})` : `hsla(${hue(h, heads)},70%,45%,${w})`;
          ctx.lineWidth = i === explainedRow ? 2 : 1;
          ctx.beginPath();
          ctx.moveTo(xl + 4, 20 + i * row);
          ctx.lineTo(xr - 4, 20 + j * row);
          ctx.stroke();
        }
      }
    }
    ctx.fillStyle = "#111";
    ctx.textAlign = "right";
    queries.forEach((t, i) => { ctx.fillStyle = i === explainedRow ? "#1f4fbf" : "#111"; ctx.fillText(t, xl - 4, 24 + i * row); });
    ctx.textAlign = "left";
    ctx.fillStyle = "#111";
    keys.forEach((t, j) => ctx.fillText(t, xr + 4, 24 + j * row));
    renderModel();
    box.querySelector(".note").textContent = (mean ? "" : `Heads ${state.heads.join(", ")} overlaid, each in its button's colour. `) + `Layer ${layer.number} of ${layer.count} of ${layer.query} (${layer.name}, ${layer.kind}: ${layer.query} → ${layer.key}); ` +
      `lines from each query token (left) to the key tokens (right) it attends to, opacity = weight (weights under 0.005 not drawn). ` +
      `Weights are stored with 8 bits per weight (within 0.2% of each row's largest weight).`;
  }

  function render() {
    renderStatus();
    renderText();
    renderCompare();
    renderMap();
    renderHeads();
    renderModel();
    document.body.dataset.source = String(state.source);
    document.body.dataset.layer = String(state.layer);
    document.body.dataset.method = state.method;
  }

  // -- controls ---------------------------------------------------------------------------------------
  function buildControls() {
    const methods = $("methods");
    DATA.methods.forEach((m, k) => {
      const id = `method-${m.name}`;
      const input = el("input", { type: "radio", name: "method", id, value: m.name });
      if (k === 0) input.checked = true;
      input.onchange = () => { state.method = m.name; state.mapStream = null; render(); };
      const label = el("label", { for: id }, m.title);
      methods.append(input, label);
    });
    const slider = $("layer");
    slider.max = String(depth - 1);
    slider.value = String(state.layer);
    slider.oninput = () => {
      state.layer = Number(slider.value);
      if (DATA.layers && DATA.stream_layers) {
        const index = DATA.stream_layers[state.layer];
        const at = DATA.layers.findIndex((l) => l.index === index);
        if (at >= 0) { state.headLayer = at; $("head-layer").value = String(at); }
      }
      render();
    };
    $("exclude-special").onchange = (e) => { state.exclude = e.target.checked; render(); };
    $("shared-scale").onchange = (e) => { state.shared = e.target.checked; render(); };
    $("log-scale").onchange = (e) => { state.log = e.target.checked; render(); };
    $("only-source").onchange = (e) => { state.onlySource = e.target.checked; renderHeads(); };
    $("map-stream").onchange = (e) => { state.mapStream = e.target.value; renderMap(); };
    $("text").onclick = (event) => {
      const span = event.target.closest(".tok");
      if (!span || span.dataset.stream !== DATA.explained) return;
      const k = item().sources.indexOf(Number(span.dataset.index));
      if (k < 0) {
        $("status").textContent = `“${span.textContent}” was not explained (the explanation covers only some tokens: explain with sources=None).`;
        return;
      }
      state.source = k;
      render();
    };
    const items = $("item");
    DATA.items.forEach((_, b) => items.appendChild(el("option", { value: String(b) }, `text ${b + 1}`)));
    items.onchange = () => { state.item = Number(items.value); state.source = 0; CACHE.clear(); render(); };
    if (DATA.items.length < 2) items.parentElement.style.display = "none";
    const heads = $("head-layer");
    (DATA.layers || []).forEach((l, k) => heads.appendChild(el("option", { value: String(k) }, `${l.query} L${l.number}: ${l.name} (${l.kind})`)));
    heads.onchange = () => { state.headLayer = Number(heads.value); renderHeads(); };
    if (DATA.layers && DATA.stream_layers) {
      const at = DATA.layers.findIndex((l) => l.index === DATA.stream_layers[state.layer]);
      state.headLayer = at >= 0 ? at : 0;
      heads.value = String(state.headLayer);
    }
    if (DATA.causal) state.source = item().sources.length - 1;
  }

  inflate(DATA.blob).then((bytes) => {
    BYTES = bytes;
    buildControls();
    render();
    document.body.dataset.ready = "1";
  }).catch((error) => {
    $("status").textContent = "Cannot show this page: " + error.message;
    console.error(error);
  });
})();
