/* augnet report page (index.html of a data-set run). Hand-written, no external resources.
 *
 * Data: the page's configuration is a JSON block (#augnet-config); the rows come in chunk files
 * (index_files/rows-NNNNNN.js) that call augnetReport.add(i, JSON text of {s: strings, r: rows})
 * and are loaded by deferred script elements before DOMContentLoaded. A row is
 *   [name, input, outputs, predictions, jacobian_l2, jacobian_max_abs, dir, maps, sheet, thumb,
 *    top_prediction, norm, max_abs]
 * where maps[j] (the picture of outputs[j]) and sheet are an index into the chunk's string table s
 * (a file name inside dir), a full relative URL, or null (see augnet/_html.py, index_row). Every
 * value reaches the page through textContent or DOM properties, never as HTML.
 */
"use strict";
(function () {
  const R = (window.augnetReport = {
    chunks: [],
    add(i, data) {
      if (R.firstChunkMs === undefined) R.firstChunkMs = performance.now();
      R.chunks[i] = typeof data === "string" ? JSON.parse(data) : data;
    },
  });

  const SORTS = {
    order: { label: "Run order", dir: 1 },
    name: { label: "Name", dir: 1 },
    pred: { label: "Prediction", dir: -1 },
    norm: { label: "Jacobian norm ‖J‖", dir: -1 },
    maxabs: { label: "Largest |J| element", dir: -1 },
  };
  const PAGE_SIZES = [25, 50, 100, 200];
  const SHOW_PREDS = 5;
  const SHOW_MAPS = 3;

  let cfg;
  let rows = [];
  let view = [];
  let allOutputs = [];
  const state = { q: "", out: "", sort: "order", dir: 1, page: 1, size: 50 };
  const $ = (id) => document.getElementById(id);

  // -- helpers -----------------------------------------------------------------------------

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function num(v) {
    if (typeof v === "number") return v;
    if (typeof v === "string") return Number(v); // "NaN", "Infinity", "-Infinity"
    return NaN;
  }

  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (!Number.isFinite(v)) return v > 0 ? "∞" : "−∞";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a < 1e-4 || a >= 1e6) return v.toExponential(2).replace("e+", "e").replace("-", "−");
    return String(Number(v.toPrecision(3))).replace("-", "−");
  }

  function group(n) {
    return n.toLocaleString("en-US");
  }

  function fileUrl(f, dir, strings) {
    if (f === null || f === undefined) return null;
    if (typeof f === "number") {
      const base = strings[f];
      if (base === undefined) return null;
      return dir ? dir + "/" + base : base;
    }
    return String(f);
  }

  // -- data --------------------------------------------------------------------------------

  function decode() {
    // Cheap per row: the sort keys come precomputed; the arrays are expanded by expand() only
    // for the rows drawn on the page.
    const seen = new Map();
    const out = [];
    const outputs = new Set();
    for (let c = 0; c < cfg.chunks.length; c++) {
      const chunk = R.chunks[c];
      if (!chunk || !Array.isArray(chunk.r)) continue;
      const s = Array.isArray(chunk.s) ? chunk.s : [];
      for (const r of chunk.r) {
        if (!Array.isArray(r) || typeof r[1] !== "string") continue;
        const o = Array.isArray(r[2]) ? r[2] : [];
        for (const k of o) if (Number.isInteger(k)) outputs.add(k);
        const row = {
          name: typeof r[0] === "string" ? r[0] : r[1],
          input: r[1],
          raw: r,
          strings: s,
          topPred: num(r[10]),
          norm: num(r[11]),
          maxAbs: num(r[12]),
          search: null,
          full: null,
        };
        const previous = seen.get(row.input);
        if (previous !== undefined) out[previous] = null; // a recomputed input: the latest wins
        seen.set(row.input, out.length);
        out.push(row);
      }
    }
    rows = seen.size === out.length ? out : out.filter((r) => r !== null);
    rows.forEach((r, i) => (r.i = i));
    allOutputs = Array.from(outputs).sort((a, b) => a - b);
  }

  function expand(row) {
    if (row.full) return row.full;
    const r = row.raw;
    const arr = (v, f) => (Array.isArray(v) ? v.map(f) : []);
    const dir = typeof r[6] === "string" ? r[6] : "";
    row.full = {
      out: arr(r[2], (v) => (Number.isInteger(v) ? v : null)),
      pred: arr(r[3], num),
      l2: arr(r[4], num),
      mx: arr(r[5], num),
      dir,
      maps: arr(r[7], (f) => fileUrl(f, dir, row.strings)),
      sheet: fileUrl(r[8], dir, row.strings),
      thumb: typeof r[9] === "string" ? r[9] : null,
    };
    return row.full;
  }

  function outputsOf(row) {
    return Array.isArray(row.raw[2]) ? row.raw[2] : [];
  }

  function sortKey(r, sort, k) {
    if (k === null) {
      if (sort === "pred") return r.topPred;
      if (sort === "norm") return r.norm;
      return r.maxAbs;
    }
    const j = outputsOf(r).indexOf(k);
    if (j < 0) return NaN;
    const col = sort === "pred" ? 3 : sort === "norm" ? 4 : 5;
    return Array.isArray(r.raw[col]) ? num(r.raw[col][j]) : NaN;
  }

  function recompute() {
    const tokens = state.q.toLowerCase().split(/\s+/).filter(Boolean);
    const k = state.out === "" ? null : Number(state.out);
    let v = rows;
    if (tokens.length) {
      v = v.filter((r) => {
        if (r.search === null) r.search = (r.name + "\n" + r.input).toLowerCase();
        return tokens.every((t) => r.search.includes(t));
      });
    }
    if (k !== null) v = v.filter((r) => outputsOf(r).includes(k));
    v = v.slice();
    const d = state.dir;
    if (state.sort === "name") {
      const coll = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
      v.sort((a, b) => d * coll.compare(a.name, b.name) || a.i - b.i);
    } else if (state.sort === "order") {
      if (d < 0) v.reverse();
    } else {
      const key = new Float64Array(rows.length);
      for (const r of v) key[r.i] = sortKey(r, state.sort, k);
      v.sort((a, b) => {
        const x = key[a.i];
        const y = key[b.i];
        const xn = Number.isNaN(x);
        const yn = Number.isNaN(y);
        if (xn || yn) return xn === yn ? a.i - b.i : xn ? 1 : -1; // missing values last
        return x === y ? a.i - b.i : d * (x < y ? -1 : 1);
      });
    }
    view = v;
    const pages = Math.max(1, Math.ceil(view.length / state.size));
    state.page = Math.min(Math.max(1, state.page), pages);
  }

  // -- state in the address (so that a reload during a running job keeps the view) --------------

  function readHash() {
    const p = new URLSearchParams(location.hash.replace(/^#/, ""));
    if (p.has("q")) state.q = p.get("q");
    if (p.has("out") && /^\d+$/.test(p.get("out"))) state.out = p.get("out");
    if (p.has("sort") && SORTS[p.get("sort")]) {
      state.sort = p.get("sort");
      state.dir = SORTS[state.sort].dir;
    }
    if (p.get("dir") === "asc") state.dir = 1;
    if (p.get("dir") === "desc") state.dir = -1;
    const size = Number(p.get("size"));
    if (PAGE_SIZES.includes(size)) state.size = size;
    const page = Number(p.get("page"));
    if (Number.isInteger(page) && page > 0) state.page = page;
  }

  function writeHash() {
    const p = new URLSearchParams();
    if (state.q) p.set("q", state.q);
    if (state.out !== "") p.set("out", state.out);
    if (state.sort !== "order") p.set("sort", state.sort);
    if (state.dir !== SORTS[state.sort].dir) p.set("dir", state.dir > 0 ? "asc" : "desc");
    if (state.size !== 50) p.set("size", String(state.size));
    if (state.page !== 1) p.set("page", String(state.page));
    const hash = p.toString();
    try {
      history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
    } catch (e) {
      // some browsers refuse replaceState on file:// pages; the view still works
    }
  }

  // -- rendering -----------------------------------------------------------------------------

  function imageWithFallback(candidates, alt, box) {
    const urls = candidates.filter(Boolean);
    if (!urls.length) {
      box.appendChild(el("span", "none", "no preview"));
      return;
    }
    const img = document.createElement("img");
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = alt;
    let n = 0;
    img.addEventListener("error", () => {
      n += 1;
      if (n < urls.length) img.src = urls[n];
      else img.replaceWith(el("span", "none", "no preview"));
    });
    img.src = urls[0];
    box.appendChild(img);
  }

  function renderFacts() {
    document.title = cfg.title;
    $("title").textContent = cfg.title;
    const facts = $("facts");
    facts.replaceChildren();
    for (const [label, value] of cfg.facts || []) {
      const span = el("span", null, label + " ");
      span.appendChild(el("b", null, value));
      facts.appendChild(span);
    }
    const n = el("span", null, "inputs ");
    n.appendChild(el("b", null, group(rows.length)));
    facts.appendChild(n);
    const updated = el("span", null, "updated ");
    updated.appendChild(el("b", null, document.lastModified));
    facts.appendChild(updated);

    const total = cfg.total;
    if (Number.isInteger(total) && total > 0) {
      const done = Math.min(rows.length, total);
      $("progress").hidden = false;
      $("progress-fill").style.width = ((100 * done) / total).toFixed(2) + "%";
      $("progress-label").textContent =
        done < total
          ? `${group(done)} of ${group(total)} inputs finished — reload the page to see newer results`
          : `all ${group(total)} inputs finished`;
    }
    const warnings = [];
    const missing = cfg.chunks.filter((_, i) => !R.chunks[i]).length;
    if (missing) warnings.push(`${missing} part(s) of the index could not be loaded: reload the page.`);
    if (cfg.skipped)
      warnings.push(`${group(cfg.skipped)} line(s) of summary.jsonl could not be read and are not listed.`);
    $("warn").hidden = !warnings.length;
    $("warn").textContent = warnings.join(" ");
  }

  function renderControls() {
    const sel = $("out");
    sel.replaceChildren(new Option("all outputs", ""));
    for (const k of allOutputs) sel.appendChild(new Option("output " + k, String(k)));
    if (state.out !== "" && !allOutputs.includes(Number(state.out))) state.out = "";
    sel.value = state.out;
    const sort = $("sort");
    sort.replaceChildren();
    for (const [key, s] of Object.entries(SORTS)) sort.appendChild(new Option(s.label, key));
    const size = $("size");
    size.replaceChildren();
    for (const n of PAGE_SIZES) size.appendChild(new Option(n + " per page", String(n)));
    $("q").value = state.q;
  }

  function syncControls() {
    $("sort").value = state.sort;
    $("dir").textContent = state.dir > 0 ? "↑ ascending" : "↓ descending";
    $("size").value = String(state.size);
    for (const th of document.querySelectorAll("th.sortable")) {
      const on = th.dataset.sort === state.sort;
      th.classList.toggle("sorted", on);
      th.querySelector(".arrow").textContent = on ? (state.dir > 0 ? "▲" : "▼") : "";
      th.setAttribute("aria-sort", on ? (state.dir > 0 ? "ascending" : "descending") : "none");
    }
  }

  function renderRow(row, position, k) {
    const r = Object.assign({ name: row.name, input: row.input, norm: row.norm, maxAbs: row.maxAbs }, expand(row));
    const tr = el("tr");
    tr.dataset.input = r.input;
    tr.appendChild(el("td", "pos num", group(position)));

    const thumb = el("td", "thumb");
    const box = el("div", "thumbbox");
    imageWithFallback([r.thumb, ...r.maps], "input " + r.name, box);
    thumb.appendChild(box);
    tr.appendChild(thumb);

    const inp = el("td", "input");
    const name = el(r.dir ? "a" : "div", "name", r.name);
    if (r.dir) {
      name.href = r.dir + "/";
      name.title = "open the folder of " + r.name;
    }
    inp.appendChild(name);
    const path = el("div", "path", r.input);
    path.title = r.input;
    inp.appendChild(path);
    const norms = el("div", "norm num");
    norms.textContent = `‖J‖ ${fmt(r.norm)} · max |J| ${fmt(r.maxAbs)}`;
    norms.title = "Frobenius norm of the Jacobian over the selected outputs; its largest element";
    inp.appendChild(norms);
    tr.appendChild(inp);

    // predictions: the selected output first, then the largest
    const preds = el("td", "preds");
    const order = r.out.map((_, j) => j);
    order.sort((a, b) => (Number.isNaN(r.pred[a]) ? 1 : Number.isNaN(r.pred[b]) ? -1 : r.pred[b] - r.pred[a]));
    if (k !== null) {
      const j = r.out.indexOf(k);
      if (j >= 0) order.splice(order.indexOf(j), 1), order.unshift(j);
    }
    const scale = Math.max(...r.pred.filter(Number.isFinite).map(Math.abs), 0) || 1;
    for (const j of order.slice(0, SHOW_PREDS)) {
      const line = el("div", "pred");
      line.appendChild(el("span", "k num" + (r.out[j] === k ? " hl" : ""), "out " + r.out[j]));
      const track = el("div", "track");
      const fill = el("div", "fill" + (r.pred[j] < 0 ? " neg" : ""));
      const w = Number.isFinite(r.pred[j]) ? Math.abs(r.pred[j]) / scale : 0;
      fill.style.width = (100 * w).toFixed(1) + "%";
      track.appendChild(fill);
      line.appendChild(track);
      line.appendChild(el("span", "v num", fmt(r.pred[j])));
      preds.appendChild(line);
    }
    if (order.length > SHOW_PREDS) preds.appendChild(el("div", "more", `+ ${order.length - SHOW_PREDS} more outputs`));
    tr.appendChild(preds);

    // the most sensitive outputs: largest ‖J‖ first
    const sens = el("td", "sens");
    const maps = el("div", "maps");
    const byNorm = r.out.map((_, j) => j).filter((j) => !Number.isNaN(r.l2[j]));
    byNorm.sort((a, b) => r.l2[b] - r.l2[a]);
    for (const j of byNorm.slice(0, SHOW_MAPS)) {
      const fig = el("figure", "map");
      const url = r.maps[j];
      if (url) {
        const img = document.createElement("img");
        img.loading = "lazy";
        img.decoding = "async";
        img.src = url;
        img.alt = `saliency of output ${r.out[j]} for ${r.name}`;
        fig.appendChild(img);
        fig.addEventListener("click", () =>
          openLightbox([{ src: url, caption: `${r.name} — output ${r.out[j]}, ‖J‖ ${fmt(r.l2[j])}` }], 0)
        );
      } else {
        fig.appendChild(el("div", "none"));
      }
      const cap = el("figcaption");
      cap.appendChild(el("b", null, "out " + r.out[j]));
      cap.appendChild(document.createElement("br"));
      cap.appendChild(el("span", "num", fmt(r.l2[j])));
      fig.appendChild(cap);
      fig.title = `output ${r.out[j]}: ‖J‖ = ${r.l2[j]}, max |J| = ${r.mx[j]}`;
      maps.appendChild(fig);
    }
    sens.appendChild(maps);
    tr.appendChild(sens);

    const sheet = el("td", "sheet");
    if (r.sheet) {
      const b = el("button", "link", "Contact sheet");
      b.type = "button";
      b.addEventListener("click", () => openSheets(row));
      sheet.appendChild(b);
    } else {
      sheet.appendChild(el("span", "more", "no contact sheet"));
    }
    tr.appendChild(sheet);
    return tr;
  }

  function render() {
    const t0 = performance.now();
    recompute();
    syncControls();
    writeHash();
    const k = state.out === "" ? null : Number(state.out);
    const pages = Math.max(1, Math.ceil(view.length / state.size));
    const start = (state.page - 1) * state.size;
    const slice = view.slice(start, start + state.size);
    const body = $("rows");
    if (!slice.length) {
      const tr = el("tr");
      const td = el("td", "empty");
      td.colSpan = 6;
      td.textContent = rows.length
        ? "No input matches the search."
        : "No finished inputs yet. Reload the page while the run writes results.";
      tr.appendChild(td);
      body.replaceChildren(tr);
    } else {
      body.replaceChildren(...slice.map((r, i) => renderRow(r, start + i + 1, k)));
    }
    const filtered = view.length !== rows.length ? ` (of ${group(rows.length)})` : "";
    $("count").textContent = view.length
      ? `${group(start + 1)}–${group(start + slice.length)} of ${group(view.length)}${filtered}`
      : `0 of ${group(rows.length)}`;
    $("page").value = String(state.page);
    $("page").max = String(pages);
    $("pages").textContent = "of " + group(pages);
    $("first").disabled = $("prev").disabled = state.page <= 1;
    $("last").disabled = $("next").disabled = state.page >= pages;
    R.lastRenderMs = performance.now() - t0;
  }

  // -- lightbox ------------------------------------------------------------------------------

  let lb = { items: [], i: 0 };

  function openSheets(r) {
    const items = [];
    const start = (state.page - 1) * state.size;
    for (const x of view.slice(start, start + state.size)) {
      const sheet = expand(x).sheet;
      if (sheet) items.push({ src: sheet, caption: x.name + " — contact sheet", row: x });
    }
    openLightbox(items, Math.max(0, items.findIndex((it) => it.row === r)));
  }

  function openLightbox(items, i) {
    lb = { items, i };
    showLightbox();
    $("lightbox").hidden = false;
    $("lb-close").focus();
  }

  function showLightbox() {
    const it = lb.items[lb.i];
    $("lb-img").style.width = $("lb-img").style.height = "";
    $("lb-img").src = it.src;
    $("lb-img").alt = it.caption;
    $("lb-caption").textContent = it.caption;
    $("lb-open").href = it.src;
    $("lb-prev").hidden = $("lb-next").hidden = lb.items.length < 2;
  }

  function fitLightbox() {
    // as large as the window allows (small maps enlarged, up to 8x), never distorted
    const img = $("lb-img");
    if (!img.naturalWidth || $("lightbox").hidden) return;
    const w = window.innerWidth - 48;
    const h = window.innerHeight - 110;
    const scale = Math.min(w / img.naturalWidth, h / img.naturalHeight, 8);
    img.style.width = Math.floor(img.naturalWidth * scale) + "px";
    img.style.height = Math.floor(img.naturalHeight * scale) + "px";
    img.classList.toggle("pixels", scale > 1.5);
  }

  function closeLightbox() {
    $("lightbox").hidden = true;
    $("lb-img").removeAttribute("src");
  }

  function step(d) {
    if (lb.items.length < 2) return;
    lb.i = (lb.i + d + lb.items.length) % lb.items.length;
    showLightbox();
  }

  // -- wiring --------------------------------------------------------------------------------

  function wire() {
    let timer = null;
    $("q").addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        state.q = $("q").value;
        state.page = 1;
        render();
      }, 120);
    });
    $("out").addEventListener("change", () => {
      state.out = $("out").value;
      if (state.out !== "" && state.sort === "order") {
        state.sort = "pred";
        state.dir = -1;
      }
      state.page = 1;
      render();
    });
    const setSort = (s) => {
      if (state.sort === s) state.dir = -state.dir;
      else {
        state.sort = s;
        state.dir = SORTS[s].dir;
      }
      state.page = 1;
      render();
    };
    $("sort").addEventListener("change", () => {
      state.sort = $("sort").value;
      state.dir = SORTS[state.sort].dir;
      state.page = 1;
      render();
    });
    for (const th of document.querySelectorAll("th.sortable")) {
      th.addEventListener("click", () => setSort(th.dataset.sort));
    }
    $("dir").addEventListener("click", () => {
      state.dir = -state.dir;
      state.page = 1;
      render();
    });
    $("size").addEventListener("change", () => {
      const first = (state.page - 1) * state.size;
      state.size = Number($("size").value);
      state.page = Math.floor(first / state.size) + 1;
      render();
    });
    const go = (p) => {
      state.page = p;
      render();
      window.scrollTo(0, 0);
    };
    $("first").addEventListener("click", () => go(1));
    $("prev").addEventListener("click", () => go(state.page - 1));
    $("next").addEventListener("click", () => go(state.page + 1));
    $("last").addEventListener("click", () => go(Math.ceil(view.length / state.size)));
    $("page").addEventListener("change", () => {
      const text = $("page").value.trim();
      const p = Number(text);
      if (text && Number.isInteger(p)) go(p); // clamped to the pages there are
    });
    $("lb-close").addEventListener("click", closeLightbox);
    $("lb-img").addEventListener("load", fitLightbox);
    window.addEventListener("resize", fitLightbox);
    $("lb-prev").addEventListener("click", () => step(-1));
    $("lb-next").addEventListener("click", () => step(1));
    $("lightbox").addEventListener("click", (e) => {
      if (e.target === $("lightbox")) closeLightbox();
    });
    document.addEventListener("keydown", (e) => {
      if ($("lightbox").hidden) return;
      if (e.key === "Escape") closeLightbox();
      else if (e.key === "ArrowLeft") step(-1);
      else if (e.key === "ArrowRight") step(1);
    });
  }

  function main() {
    const t0 = performance.now();
    R.chunksMs = t0 - (R.firstChunkMs || t0);
    cfg = JSON.parse($("augnet-config").textContent);
    decode();
    readHash();
    renderControls();
    renderFacts();
    wire();
    render();
    R.rows = rows.length;
    R.decodeMs = performance.now() - t0;
    R.readyMs = performance.now(); // since navigation start
    document.body.dataset.ready = "1";
  }

  document.addEventListener("DOMContentLoaded", main);
})();
