// Point picker for "Edit2Perceive Point Prompt": click on the picture inside the node to place the matting points.
//
// The points live in the node's own `positive_coords` text widget as KJNodes Points Editor JSON with normalized
// coordinates ([{"x": 0.31, "y": 0.52}, ...]), so saved workflows, the API prompt and a linked KJNodes
// `positive_coords` work as before; the picker itself is not saved. The glow over the picture is the soft point map
// the model will see, drawn by the server (nodes/point_picker.py) with e2p_core's own rasterisation at the
// processing size of the perceive node the prompt feeds: no rule of the point map is restated here.
//
// Loaded by ComfyUI's frontend (1.32) from the pack's WEB_DIRECTORY; plain ES module, no build step.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "E2PPointPrompt";
const POINTS_WIDGET = "positive_coords";
const PICTURE_UI_KEY = "e2p_picture"; // nodes/point_picker.py PICTURE_UI_KEY
const POINT_MAP_ROUTE = "/e2p/point_map"; // nodes/point_picker.py POINT_MAP_ROUTE
const PERCEIVE_TYPE = "E2PPerceive";
const PICKER_WIDGET = "point_picker";

const HIT_RADIUS_PX = 9; // a click this close to a point (node pixels) removes it
const MARKER_RADIUS_PX = 5;
const MARKER_FILL = "#00ff66";
const MAP_TINT = [255, 40, 170]; // the point map's glow colour; its opacity is the map's value
const MAP_OPACITY = 0.85;
const COORD_DECIMALS = 5; // 1e-5 of the side: sub-pixel even for a 16384 px image
const MIN_PICTURE_HEIGHT_PX = 160;
const DEFAULT_NODE_SIZE = [360, 560];

/** The node's widget called `name`, if any. */
function widgetOf(node, name) {
  return (node.widgets ?? []).find((widget) => widget.name === name);
}

/** True when the widget `name` has become an input that is linked (its value then arrives at run time). */
function isLinked(node, name) {
  return (node.inputs ?? []).some((input) =>
    (input.widget?.name === name || input.name === name) && input.link != null);
}

/**
 * The points of the widget text as [{x, y}] in 0..1 of the picture, or null when the text is not a point list.
 * Reads what e2p_core.points.parse_points reads ('[{"x":..,"y":..}]' or '[[x, y]]', single quotes tolerated;
 * an empty text, "" or [] is no points) and interprets the coordinate space as to_pixel_coords does: 'auto' is
 * normalized when every coordinate lies in 0..1, else pixels (which need the picture's size).
 */
function readPoints(text, space, size) {
  let data;
  try {
    data = (text ?? "").trim() ? JSON.parse(text.replace(/'/g, '"')) : [];
  } catch {
    return null;
  }
  if (data === "") data = [];
  if (!Array.isArray(data)) return null;
  const raw = [];
  for (const entry of data) {
    const [x, y] = Array.isArray(entry) ? entry : [entry?.x, entry?.y];
    if (!Number.isFinite(x) || !Number.isFinite(y)) return null;
    raw.push([x, y]);
  }
  const inUnitSquare = raw.every(([x, y]) => x >= 0 && x <= 1 && y >= 0 && y <= 1);
  const normalized = space === "normalized" || (space !== "pixels" && inUnitSquare);
  if (normalized) return raw.map(([x, y]) => ({ x, y }));
  if (!size) return null;
  return raw.map(([x, y]) => ({ x: x / size.width, y: y / size.height }));
}

function pointsText(points) {
  const round = (value) => Number(value.toFixed(COORD_DECIMALS));
  return JSON.stringify(points.map((point) => ({ x: round(point.x), y: round(point.y) })));
}

/** "sub/name.png [input]" (a Load Image value) -> the /view URL of that file. */
function viewUrl(value, defaultType) {
  const match = /^(.*?)(?: \[(input|output|temp)\])?$/.exec(value);
  const path = match[1];
  const slash = path.lastIndexOf("/");
  const params = new URLSearchParams({
    filename: path.slice(slash + 1),
    subfolder: slash >= 0 ? path.slice(0, slash) : "",
    type: match[2] ?? defaultType,
  });
  return api.apiURL(`/view?${params}`);
}

class PointPicker {
  constructor(node) {
    this.node = node;
    this.lastRun = null; // {url, width, height} of the picture the node returned in its last run
    this.picture = null; // {url, image: HTMLImageElement, loaded}
    this.map = null; // {key, tinted: canvas | null}
    this.drawnKey = "";

    this.element = document.createElement("div");
    this.element.className = "e2p-point-picker";
    Object.assign(this.element.style,
      { display: "flex", flexDirection: "column", gap: "4px", boxSizing: "border-box" });

    const bar = document.createElement("div");
    Object.assign(bar.style, { display: "flex", alignItems: "center", gap: "8px", fontSize: "11px", flex: "0 0 auto" });
    this.clearButton = document.createElement("button");
    this.clearButton.textContent = "Clear points";
    this.clearButton.className = "e2p-clear-points";
    Object.assign(this.clearButton.style, { fontSize: "11px", padding: "1px 8px", cursor: "pointer" });
    this.clearButton.addEventListener("click", (event) => {
      event.stopPropagation();
      this.setPoints([]);
    });
    this.status = document.createElement("span");
    this.status.className = "e2p-picker-status";
    Object.assign(this.status.style,
      { opacity: "0.8", whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" });
    bar.append(this.clearButton, this.status);

    this.canvas = document.createElement("canvas");
    Object.assign(this.canvas.style, { flex: "1 1 auto", minHeight: "0", width: "100%", cursor: "crosshair" });
    this.canvas.addEventListener("click", (event) => this.onClick(event, false));
    this.canvas.addEventListener("contextmenu", (event) => this.onClick(event, true));
    this.element.append(bar, this.canvas);
  }

  // ------------------------------------------------------------------------------------------------ the graph

  /** Where the picture comes from: the upstream Load Image's file, else the node's picture of the last run. */
  pictureSource() {
    const slot = this.node.findInputSlot?.("image") ?? -1;
    const upstream = slot >= 0 ? this.node.getInputNode(slot) : null;
    const fileWidget = upstream && widgetOf(upstream, "image");
    if (fileWidget && typeof fileWidget.value === "string" && fileWidget.value) {
      return { url: viewUrl(fileWidget.value, "input") };
    }
    return this.lastRun;
  }

  /** The processing settings of the perceive node the prompt feeds (the server's defaults when there is none). */
  processing() {
    const perceive = (this.node.getOutputNodes?.(0) ?? []).find((node) => node.type === PERCEIVE_TYPE);
    const settings = {};
    for (const name of ["resize_mode", "resolution"]) {
      const widget = perceive && widgetOf(perceive, name);
      if (widget) settings[name] = String(widget.value);
    }
    return settings;
  }

  pictureSize() {
    if (this.lastRun && this.picture?.url === this.lastRun.url) return this.lastRun; // may have been downscaled
    const image = this.picture?.loaded ? this.picture.image : null;
    return image ? { width: image.naturalWidth, height: image.naturalHeight } : null;
  }

  currentPoints() {
    const text = widgetOf(this.node, POINTS_WIDGET)?.value ?? "";
    return readPoints(text, widgetOf(this.node, "coords_space")?.value ?? "auto", this.pictureSize());
  }

  setPoints(points) {
    if (isLinked(this.node, POINTS_WIDGET)) return;
    const widget = widgetOf(this.node, POINTS_WIDGET);
    widget.value = pointsText(points);
    const space = widgetOf(this.node, "coords_space");
    if (space && space.value === "pixels") space.value = "normalized"; // the picker writes 0..1
    this.node.graph?.setDirtyCanvas(true, true);
    this.refresh(true);
  }

  // ------------------------------------------------------------------------------------------------ clicks

  /** The picture's rectangle in the canvas, in node pixels (drawn whole and centred, "contain"). */
  pictureRect() {
    const size = this.pictureSize();
    const width = this.canvas.clientWidth, height = this.canvas.clientHeight;
    if (!size || !width || !height) return null;
    const scale = Math.min(width / size.width, height / size.height);
    const w = size.width * scale, h = size.height * scale;
    return { x: (width - w) / 2, y: (height - h) / 2, w, h };
  }

  onClick(event, isRightClick) {
    event.preventDefault();
    event.stopPropagation();
    const rect = this.pictureRect();
    const points = this.currentPoints();
    if (!rect || !points || isLinked(this.node, POINTS_WIDGET)) return;
    // Client pixels -> node pixels: the graph's zoom scales the element with a CSS transform.
    const box = this.canvas.getBoundingClientRect();
    const x = ((event.clientX - box.left) * this.canvas.clientWidth) / box.width;
    const y = ((event.clientY - box.top) * this.canvas.clientHeight) / box.height;
    const distances = points.map((p) => Math.hypot(rect.x + p.x * rect.w - x, rect.y + p.y * rect.h - y));
    const nearest = distances.indexOf(Math.min(...distances));
    if (nearest >= 0 && distances[nearest] <= HIT_RADIUS_PX) {
      this.setPoints(points.filter((_, index) => index !== nearest));
    } else if (!isRightClick) {
      const u = (x - rect.x) / rect.w, v = (y - rect.y) / rect.h;
      if (u >= 0 && u <= 1 && v >= 0 && v <= 1) this.setPoints([...points, { x: u, y: v }]);
    }
  }

  // ------------------------------------------------------------------------------------------------ drawing

  /** Called on every draw of the graph: redraws only when something it shows has changed. */
  refresh(force = false) {
    const source = this.pictureSource();
    if (source?.url !== this.picture?.url) this.loadPicture(source);
    const points = this.currentPoints();
    const size = this.pictureSize();
    this.updateMap(points, size);
    const key = JSON.stringify([this.picture?.url, this.picture?.loaded, size, points, this.map?.key,
      !!this.map?.tinted, this.canvas.clientWidth, this.canvas.clientHeight, this.statusText(points, size)]);
    if (force || key !== this.drawnKey) {
      this.drawnKey = key;
      this.draw(points);
    }
  }

  loadPicture(source) {
    if (!source) {
      this.picture = null;
      return;
    }
    const image = new Image();
    const picture = { url: source.url, image, loaded: false, failed: false };
    image.onload = () => {
      picture.loaded = true;
      this.refresh();
    };
    image.onerror = () => {
      picture.failed = true;
      this.refresh(true);
    };
    image.src = source.url;
    this.picture = picture;
  }

  /** Ask the server for the point map of these points (once per change) and tint it for drawing. */
  updateMap(points, size) {
    if (!points?.length || !size || this.maskConnected()) {
      this.map = null;
      return;
    }
    const query = new URLSearchParams({
      points: pointsText(points), coords_space: "normalized", mode: widgetOf(this.node, "mode")?.value ?? "app",
      width: String(size.width), height: String(size.height), ...this.processing(),
    });
    const key = query.toString();
    if (this.map?.key === key) return;
    const map = { key, tinted: null };
    this.map = map;
    api.fetchApi(`${POINT_MAP_ROUTE}?${key}`, { cache: "no-store" })
      .then((response) => (response.ok ? response.blob() : Promise.reject(new Error(`HTTP ${response.status}`))))
      .then((blob) => createImageBitmap(blob))
      .then((bitmap) => {
        map.tinted = tint(bitmap);
        if (this.map === map) this.refresh(true);
      })
      .catch((error) => console.warn("[Edit2Perceive] point map:", error));
  }

  maskConnected() {
    return isLinked(this.node, "mask");
  }

  statusText(points, size) {
    if (!this.picture) return "connect a Load Image, or run the graph once, to see the picture";
    if (this.picture.failed) return "the picture could not be loaded";
    if (!size) return "loading the picture…";
    const dims = `${size.width}×${size.height}`;
    if (isLinked(this.node, POINTS_WIDGET)) return `${dims} · points come from a link (read only)`;
    if (!points) return `${dims} · positive_coords is not a point list: fix or clear it`;
    const count = `${points.length} point${points.length === 1 ? "" : "s"}`;
    if (this.maskConnected()) return `${dims} · ${count} · a mask is connected: the clicks are not used`;
    return `${dims} · ${count} · click: add · click a point / right-click: remove`;
  }

  draw(points) {
    const size = this.pictureSize();
    this.status.textContent = this.statusText(points, size);
    const ratio = window.devicePixelRatio || 1;
    const width = this.canvas.clientWidth, height = this.canvas.clientHeight;
    this.canvas.width = Math.max(1, Math.round(width * ratio));
    this.canvas.height = Math.max(1, Math.round(height * ratio));
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = "#1b1b1b";
    ctx.fillRect(0, 0, width, height);
    const rect = this.pictureRect();
    if (!rect || !this.picture?.loaded) return;
    ctx.drawImage(this.picture.image, rect.x, rect.y, rect.w, rect.h);
    if (this.map?.tinted) ctx.drawImage(this.map.tinted, rect.x, rect.y, rect.w, rect.h);
    for (const point of points ?? []) {
      ctx.beginPath();
      ctx.arc(rect.x + point.x * rect.w, rect.y + point.y * rect.h, MARKER_RADIUS_PX, 0, 2 * Math.PI);
      ctx.fillStyle = MARKER_FILL;
      ctx.fill();
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = "#000000";
      ctx.stroke();
    }
  }
}

/** The grey point map as a canvas in the glow colour whose opacity is the map's value. */
function tint(bitmap) {
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    const value = data[i];
    [data[i], data[i + 1], data[i + 2]] = MAP_TINT;
    data[i + 3] = Math.round(value * MAP_OPACITY);
  }
  ctx.putImageData(pixels, 0, 0);
  return canvas;
}

app.registerExtension({
  name: "Edit2Perceive.PointPicker",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const picker = new PointPicker(this);
      // Added last, after the node's own widgets, and never serialised: the points are in positive_coords.
      const widget = this.addDOMWidget(PICKER_WIDGET, "e2p_point_picker", picker.element, {
        serialize: false,
        getValue: () => "",
        setValue: () => {},
        getMinHeight: () => MIN_PICTURE_HEIGHT_PX,
        onDraw: () => picker.refresh(),
      });
      widget.serialize = false;
      this.e2pPointPicker = picker;
      this.setSize([Math.max(this.size[0], DEFAULT_NODE_SIZE[0]), Math.max(this.size[1], DEFAULT_NODE_SIZE[1])]);
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const picture = output?.[PICTURE_UI_KEY]?.[0];
      if (picture && this.e2pPointPicker) {
        this.e2pPointPicker.lastRun = { url: viewUrl(picture.filename, picture.type), width: picture.width,
                                        height: picture.height };
        this.e2pPointPicker.refresh(true);
      }
    };
  },
});
