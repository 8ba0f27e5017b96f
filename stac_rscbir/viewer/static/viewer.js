// The visual search page: footprints and thumbnails of a collection's chips on a Leaflet map;
// a click on a chip (or an uploaded image) runs POST /search with `similarity`; the ranked
// results are a thumbnail grid and footprints coloured by Hamming distance. The page state
// (query, filters, marks) lives in the URL. Leaflet is the global `L` (vendor/leaflet).

const API = new URL(".", location.href.replace(/\/viewer\/?(\?.*|#.*)?$/, "/")).href;
const MAX_ITEMS = 5000; // footprints loaded per collection, at most
const MAX_THUMBS = 300; // thumbnails drawn at once (only those in view)
const PAGE = 500;

const $ = (id) => document.getElementById(id);
const state = {
  collection: "", model: "", within: [], k: 20, maxDistance: null, from: "", to: "",
  bbox: null, query: null, image: null, relevant: [], notRelevant: [], basemap: "",
};
let map, chipsLayer, thumbsLayer, resultsLayer, bboxLayer;
let chips = new Map(); // key "collection/id" -> item
const thumbs = new Map(); // key -> image overlay
const resultLayers = new Map(); // key -> result footprint layer
let drawing = null; // {start, rect} while a box is drawn

const keyOf = (item) => `${item.collection}/${item.id}`;
const refOf = (key) => {
  const i = key.indexOf("/");
  return { collection: key.slice(0, i), id: key.slice(i + 1) };
};

function thumbnailHref(item) {
  const assets = item.assets || {};
  const entry = Object.entries(assets).find(([k, a]) => (a.roles || []).includes("thumbnail"))
    || (assets.thumbnail ? ["thumbnail", assets.thumbnail] : null);
  return entry ? entry[1].href : null;
}

function message(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const response = await fetch(new URL(path, API), options);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const what = body && (body.description || body.detail) ? (body.description || JSON.stringify(body.detail)) : response.statusText;
    const error = new Error(`${response.status} ${body && body.code ? body.code : ""}: ${what}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// --- the URL --------------------------------------------------------------------------------

function readUrl() {
  const p = new URLSearchParams(location.search);
  const list = (name) => (p.get(name) ? p.get(name).split(",").filter(Boolean) : []);
  state.collection = p.get("collection") || "";
  state.model = p.get("model") || "";
  state.within = list("within");
  state.k = Number(p.get("k")) || 20;
  state.maxDistance = p.get("max_distance") !== null && p.get("max_distance") !== "" ? Number(p.get("max_distance")) : null;
  state.from = p.get("from") || "";
  state.to = p.get("to") || "";
  const bbox = list("bbox").map(Number);
  state.bbox = bbox.length === 4 && bbox.every(Number.isFinite) ? bbox : null;
  state.query = p.get("item") || null;
  state.relevant = list("relevant");
  state.notRelevant = list("not_relevant");
  state.basemap = p.get("basemap") || "";
}

function writeUrl() {
  const p = new URLSearchParams();
  const set = (name, value) => { if (value !== null && value !== "" && value !== undefined) p.set(name, value); };
  set("collection", state.collection);
  set("model", state.model);
  if (state.within.length) set("within", state.within.join(","));
  set("k", String(state.k));
  if (state.maxDistance !== null) set("max_distance", String(state.maxDistance));
  set("from", state.from);
  set("to", state.to);
  if (state.bbox) set("bbox", state.bbox.map((v) => +v.toFixed(6)).join(","));
  set("item", state.query);
  if (state.relevant.length) set("relevant", state.relevant.join(","));
  if (state.notRelevant.length) set("not_relevant", state.notRelevant.join(","));
  set("basemap", state.basemap);
  history.replaceState(null, "", `${location.pathname}?${p}`);
}

function readControls() {
  state.collection = $("collection").value;
  state.model = $("model").value;
  state.within = [...$("within").selectedOptions].map((o) => o.value);
  state.k = Number($("k").value) || 20;
  state.maxDistance = $("max-distance").value === "" ? null : Number($("max-distance").value);
  state.from = $("date-from").value;
  state.to = $("date-to").value;
}

function showControls() {
  $("k").value = state.k;
  $("max-distance").value = state.maxDistance === null ? "" : state.maxDistance;
  $("date-from").value = state.from;
  $("date-to").value = state.to;
  for (const o of $("within").options) o.selected = state.within.includes(o.value);
  $("bbox-text").textContent = state.bbox ? `box ${state.bbox.map((v) => v.toFixed(3)).join(", ")}` : "";
  bboxLayer.clearLayers();
  if (state.bbox) {
    const [x0, y0, x1, y1] = state.bbox;
    L.rectangle([[y0, x0], [y1, x1]], { color: "#ffd400", weight: 2, dashArray: "6 4", fill: false, interactive: false }).addTo(bboxLayer);
  }
}

// --- collections, models, footprints ---------------------------------------------------------

async function loadCollections() {
  const { collections } = await api("collections");
  const withModels = collections.filter((c) => (c["cbir:models"] || []).length);
  for (const select of [$("collection"), $("within")]) {
    select.replaceChildren(...collections.map((c) => new Option(c.title || c.id, c.id)));
  }
  if (!collections.some((c) => c.id === state.collection)) {
    state.collection = (withModels[0] || collections[0] || {}).id || "";
  }
  $("collection").value = state.collection;
  return collections;
}

function showModels(collections) {
  const collection = collections.find((c) => c.id === state.collection) || {};
  const ids = (collection["cbir:models"] || []).map((m) => m.id);
  $("model").replaceChildren(...ids.map((id) => new Option(id, id)));
  if (!ids.includes(state.model)) state.model = ids[0] || "";
  $("model").value = state.model;
}

async function loadFootprints() {
  chipsLayer.clearLayers();
  thumbsLayer.clearLayers();
  thumbs.clear();
  chips = new Map();
  if (!state.collection) return;
  let url = `collections/${encodeURIComponent(state.collection)}/items?limit=${PAGE}`;
  while (url && chips.size < MAX_ITEMS) {
    const page = await api(url);
    for (const item of page.features) {
      chips.set(keyOf(item), item);
      addFootprint(item);
    }
    const next = (page.links || []).find((l) => l.rel === "next");
    url = next ? next.href : null;
  }
  const bounds = chipsLayer.getBounds();
  if (bounds.isValid()) map.fitBounds(bounds, { padding: [10, 10] });
  drawThumbnails();
}

function addFootprint(item) {
  if (!item.geometry) return;
  const layer = L.geoJSON(item, {
    style: { className: "chip", color: "#9cc3ff", weight: 1, fillOpacity: 0.02 },
  });
  layer.on("click", () => { if (!drawing) queryItem(keyOf(item)); });
  const label = document.createElement("span");
  label.textContent = item.id; // an element, not a string: Leaflet would parse a string as HTML
  layer.bindTooltip(label, { sticky: true });
  layer.addTo(chipsLayer);
  layer.eachLayer((l) => { l.getElement().dataset.key = keyOf(item); });
}

function drawThumbnails() {
  const view = map.getBounds();
  const visible = [...chips.values()].filter((item) => item.bbox && thumbnailHref(item)
    && view.intersects(L.latLngBounds([item.bbox[1], item.bbox[0]], [item.bbox[3], item.bbox[2]])));
  if (visible.length > MAX_THUMBS) return; // zoom in to see them
  for (const item of visible) {
    const key = keyOf(item);
    if (thumbs.has(key)) continue;
    const [x0, y0, x1, y1] = item.bbox;
    const overlay = L.imageOverlay(thumbnailHref(item), [[y0, x0], [y1, x1]], { pane: "thumbs", interactive: false });
    thumbs.set(key, overlay.addTo(thumbsLayer));
  }
}

// --- search ---------------------------------------------------------------------------------

function searchBody() {
  const similarity = { k: state.k };
  if (state.model) similarity.model = state.model;
  if (state.image) similarity.image = state.image;
  else similarity.item = refOf(state.query);
  if (state.maxDistance !== null) similarity.max_distance = state.maxDistance;
  if (state.relevant.length || state.notRelevant.length) {
    similarity.feedback = { relevant: state.relevant.map(refOf), not_relevant: state.notRelevant.map(refOf) };
  }
  const body = { limit: state.k, similarity, collections: state.within.length ? state.within : [state.collection] };
  if (state.bbox) body.bbox = state.bbox;
  if (state.from || state.to) {
    body.datetime = `${state.from ? `${state.from}T00:00:00Z` : ".."}/${state.to ? `${state.to}T23:59:59Z` : ".."}`;
  }
  return body;
}

async function search() {
  readControls();
  writeUrl();
  if (!state.query && !state.image) { message("Click a chip on the map, or upload an image, to search."); return; }
  const started = performance.now();
  message("searching ...");
  let answer;
  try {
    answer = await api("search", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(searchBody()) });
  } catch (error) {
    showResults([]);
    message(error.status && error.status < 500 ? `The API refused the search: ${error.message}` : `The search failed: ${error.message}`, true);
    searched();
    return;
  }
  showResults(answer.features || []);
  const ms = performance.now() - started;
  document.body.dataset.searchMs = ms.toFixed(1);
  const n = (answer.features || []).length;
  message(n ? `${n} results in ${ms.toFixed(0)} ms` : "No results: widen the box, the dates or max distance.");
  searched();
}

// a counter of finished searches, for whoever waits on the page (the browser tests)
function searched() {
  document.body.dataset.searches = String(Number(document.body.dataset.searches || 0) + 1);
}

function queryItem(key) {
  state.query = key;
  state.image = null;
  state.relevant = [];
  state.notRelevant = [];
  $("upload").value = "";
  $("query").textContent = `query: ${key}`;
  return search();
}

// hue from green (distance 0, the query itself) through yellow (the nearest other result) to
// red (the farthest shown), so the spread among the results shows whatever its range
function distanceColour(d, lo, hi) {
  const t = d === 0 ? 0 : 0.2 + 0.8 * (hi > lo ? (d - lo) / (hi - lo) : 0);
  return `hsl(${Math.round(120 * (1 - t))}, 90%, 45%)`;
}

function highlight(key, on) {
  const card = document.querySelector(`.card[data-key="${CSS.escape(key)}"]`);
  if (card) card.classList.toggle("hl", on);
  const layer = resultLayers.get(key);
  if (layer) layer.setStyle({ weight: on ? 6 : 3, fillOpacity: on ? 0.45 : 0.15 });
}

function showResults(items) {
  resultsLayer.clearLayers();
  resultLayers.clear();
  const distances = items.map((i) => i.properties["cbir:distance"]).filter((d) => d !== undefined);
  const hi = Math.max(0, ...distances);
  const lo = Math.min(hi, ...distances.filter((d) => d > 0));
  const cards = items.map((item, rank) => {
    const key = keyOf(item);
    const d = item.properties["cbir:distance"];
    const colour = distanceColour(d ?? hi, lo, hi);
    const card = document.createElement("li");
    card.className = "card";
    card.dataset.key = key;
    card.dataset.distance = d ?? "";
    const href = thumbnailHref(item);
    const image = document.createElement(href ? "img" : "div");
    if (href) { image.src = href; image.alt = item.id; image.loading = "lazy"; } else image.className = "noimg";
    const text = document.createElement("div");
    const date = (item.properties.datetime || item.properties.start_datetime || "").slice(0, 10);
    text.innerHTML = '<span class="rank"></span> <span class="dist"></span> <span class="date"></span><br><span class="id"></span>';
    text.querySelector(".rank").textContent = `#${rank + 1}`;
    text.querySelector(".dist").textContent = `d=${d ?? "?"}`;
    text.querySelector(".dist").style.color = colour;
    text.querySelector(".date").textContent = date;
    text.querySelector(".id").textContent = item.id;
    const marks = document.createElement("div");
    marks.className = "marks";
    for (const [label, list, cls] of [["relevant", "relevant", "relevant"], ["irrelevant", "notRelevant", "not-relevant"]]) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = label;
      button.title = `mark ${item.id} ${cls.replace("-", " ")}`;
      button.className = `mark-${cls}`;
      button.setAttribute("aria-pressed", String(state[list].includes(key)));
      button.addEventListener("click", () => mark(key, list));
      marks.append(button);
    }
    card.classList.toggle("relevant", state.relevant.includes(key));
    card.classList.toggle("not-relevant", state.notRelevant.includes(key));
    card.append(image, text, marks);
    card.addEventListener("mouseenter", () => highlight(key, true));
    card.addEventListener("mouseleave", () => highlight(key, false));
    if (item.geometry) {
      const layer = L.geoJSON(item, { style: { className: "result", color: colour, weight: 3, fillOpacity: 0.15 } });
      layer.on("mouseover", () => highlight(key, true));
      layer.on("mouseout", () => highlight(key, false));
      layer.on("click", () => { if (!drawing) queryItem(key); });
      layer.addTo(resultsLayer);
      layer.eachLayer((l) => { l.getElement().dataset.key = key; });
      resultLayers.set(key, layer);
    }
    return card;
  });
  $("results").replaceChildren(...cards);
}

function mark(key, list) {
  const other = list === "relevant" ? "notRelevant" : "relevant";
  state[other] = state[other].filter((k) => k !== key);
  state[list] = state[list].includes(key) ? state[list].filter((k) => k !== key) : [...state[list], key];
  for (const card of document.querySelectorAll(".card")) {
    const k = card.dataset.key;
    card.classList.toggle("relevant", state.relevant.includes(k));
    card.classList.toggle("not-relevant", state.notRelevant.includes(k));
    card.querySelector(".mark-relevant").setAttribute("aria-pressed", String(state.relevant.includes(k)));
    card.querySelector(".mark-not-relevant").setAttribute("aria-pressed", String(state.notRelevant.includes(k)));
  }
  writeUrl();
}

async function upload(file) {
  const data = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  state.image = data;
  state.query = null;
  state.relevant = [];
  state.notRelevant = [];
  $("query").textContent = `query: uploaded ${file.name} (not kept in the URL)`;
  await search();
}

// --- drawing a box --------------------------------------------------------------------------

function startDrawing() {
  drawing = { start: null, rect: null };
  map.dragging.disable();
  map.getContainer().classList.add("drawing");
  message("Drag on the map to draw the search box.");
}

function setUpDrawing() {
  map.on("mousedown", (e) => {
    if (!drawing) return;
    drawing.start = e.latlng;
    drawing.rect = L.rectangle([e.latlng, e.latlng], { color: "#ffd400", weight: 2, fill: false, interactive: false }).addTo(map);
  });
  map.on("mousemove", (e) => {
    if (drawing && drawing.start) drawing.rect.setBounds([drawing.start, e.latlng]);
  });
  map.on("mouseup", (e) => {
    if (!drawing || !drawing.start) return;
    const b = L.latLngBounds(drawing.start, e.latlng);
    map.removeLayer(drawing.rect);
    map.dragging.enable();
    map.getContainer().classList.remove("drawing");
    setTimeout(() => { drawing = null; }); // after this gesture's click event
    state.bbox = [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()];
    showControls();
    if (state.query || state.image) search(); else { writeUrl(); message("Box set: click a chip to search within it."); }
  });
}

// --- start ----------------------------------------------------------------------------------

async function start() {
  readUrl();
  map = L.map("map", { zoomSnap: 0.25, boxZoom: false });
  map.createPane("thumbs").style.zIndex = 350; // under the footprints (overlayPane, 400)
  const config = await api("viewer/config.json").catch(() => ({}));
  const basemap = state.basemap || config.basemap;
  if (basemap) L.tileLayer(basemap, { maxZoom: 19 }).addTo(map);
  map.setView([0, 0], 2);
  thumbsLayer = L.layerGroup().addTo(map);
  chipsLayer = L.featureGroup().addTo(map);
  resultsLayer = L.featureGroup().addTo(map);
  bboxLayer = L.layerGroup().addTo(map);
  map.on("moveend", drawThumbnails);
  setUpDrawing();

  $("controls").addEventListener("submit", (e) => { e.preventDefault(); search(); });
  $("refine").addEventListener("click", () => search());
  $("clear-marks").addEventListener("click", () => { state.relevant = []; state.notRelevant = []; search(); });
  $("draw-bbox").addEventListener("click", startDrawing);
  $("clear-bbox").addEventListener("click", () => { state.bbox = null; showControls(); search(); });
  $("upload").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); });
  $("model").addEventListener("change", () => search());
  let collections = [];
  $("collection").addEventListener("change", async () => {
    state.collection = $("collection").value;
    state.within = [state.collection];
    showModels(collections);
    showControls();
    writeUrl();
    await loadFootprints().catch((error) => message(`Loading the footprints failed: ${error.message}`, true));
  });

  try {
    collections = await loadCollections();
  } catch (error) {
    message(`Loading the collections failed: ${error.message}`, true);
    return;
  }
  if (!state.within.length && state.collection) state.within = [state.collection];
  showModels(collections);
  showControls();
  try {
    await loadFootprints();
  } catch (error) {
    message(`Loading the footprints failed: ${error.message}`, true);
  }
  if (state.query) {
    $("query").textContent = `query: ${state.query}`;
    await search();
  } else {
    writeUrl();
    message(chips.size ? `${chips.size} chips: click one to search.` : "This collection has no items.");
  }
  document.body.dataset.ready = "true";
}

start();
