// One version: its training settings and metrics, the curve, per-vector cosines and nearest
// tokens, and the evaluations recorded with it.
import { api } from "./api.js";
import { h, interval, pct, table } from "./dom.js";

function curve(points) {
  // points: [{step, loss, val_metric}]; loss on the left scale, validation (0..1) on the right
  const losses = points.filter((p) => p.loss !== null && p.loss !== undefined);
  const vals = points.filter((p) => p.val_metric !== null && p.val_metric !== undefined);
  if (!losses.length && !vals.length) return h("p", { class: "muted" }, "No curve was recorded with this version.");
  const width = 600, height = 240, pad = 36;
  const last = Math.max(1, ...points.map((p) => p.step));
  const top = Math.max(1e-9, ...losses.map((p) => p.loss));
  const x = (step) => pad + (step / last) * (width - 2 * pad);
  const yLoss = (loss) => height - pad - (loss / top) * (height - 2 * pad);
  const yVal = (val) => height - pad - val * (height - 2 * pad);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "curve");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `Training curve: loss ${losses.length ? losses[0].loss.toFixed(3) : "?"} to ` +
    `${losses.length ? losses[losses.length - 1].loss.toFixed(3) : "?"}, validation ` +
    `${vals.length ? pct(vals[0].val_metric) : "?"} to ${vals.length ? pct(vals[vals.length - 1].val_metric) : "?"}`);
  const line = (pts, color) => {
    const path = document.createElementNS(svg.namespaceURI, "polyline");
    path.setAttribute("points", pts.join(" "));
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", color);
    path.setAttribute("stroke-width", "2");
    svg.append(path);
  };
  const text = (tx, ty, content, color = "#5b6470") => {
    const node = document.createElementNS(svg.namespaceURI, "text");
    node.setAttribute("x", tx);
    node.setAttribute("y", ty);
    node.setAttribute("fill", color);
    node.setAttribute("font-size", "12");
    node.textContent = content;
    svg.append(node);
  };
  line([`${pad},${height - pad}`, `${width - pad},${height - pad}`], "#d8dde3");
  if (losses.length) line(losses.map((p) => `${x(p.step)},${yLoss(p.loss)}`), "#1f5fbf");
  if (vals.length) line(vals.map((p) => `${x(p.step)},${yVal(p.val_metric)}`), "#1e7b34");
  text(pad, 16, `loss (max ${top.toFixed(3)})`, "#1f5fbf");
  text(width - 180, 16, "validation metric (0-100 %)", "#1e7b34");
  text(width - pad - 40, height - 10, `step ${last}`);
  return svg;
}

export async function render(main, ref) {
  const version = await api(`/prompts/${encodeURIComponent(ref)}`);
  const meta = version.meta || {};
  const metrics = meta.metrics || {};
  const config = meta.training_config || {};
  const cosines = metrics.cosines || [];
  const nearest = metrics.nearest_tokens || [];
  main.append(
    h("h1", {}, version.id),
    h("p", { class: version.compatible ? "ok" : "error" },
      version.compatible ? "Fits the served model." : `Does not fit the served model: ${version.incompatibility}`),
    table("About this version", [["field", ([k]) => k], ["value", ([, v]) => v]], [
      ["base model", meta.base_model || "—"], ["created", meta.created_at || "—"],
      ["vectors", `${version.num_virtual_tokens} × ${version.hidden_size}`],
      ["init text", meta.init_text || "—"], ["checksum", version.checksum],
      ["versions of this name", version.versions.join(", ")],
    ]),
    h("h2", {}, "Training"),
    table("Before and after training", [["measure", ([k]) => k], ["value", ([, v]) => v, { num: true }]], [
      ["task", metrics.task || "—"], ["validation, init text", pct(metrics.val_before)],
      ["validation, trained", pct(metrics.val_after)], ["validation, hard prompt", pct(metrics.val_hard_prompt)],
      ["held-out, init text", pct(metrics.test_before)], ["held-out, trained", pct(metrics.test_after)],
      ["best step", metrics.best_step ?? "—"], ["cosine to init, mean / min",
        metrics.cosine_mean !== undefined ? `${metrics.cosine_mean.toFixed(4)} / ${metrics.cosine_min.toFixed(4)}` : "—"],
    ]),
    curve(metrics.curve || []),
    table("Training settings", [["setting", ([k]) => k], ["value", ([, v]) => JSON.stringify(v)]], Object.entries(config)),
    h("h2", {}, "Vectors"),
    table("Each vector: cosine to its init token and the nearest vocabulary token", [
      ["#", (i) => i, { num: true }],
      ["cosine to init", (i) => cosines[i] !== undefined ? h("span", {},
        h("span", { class: "bar", style: `width:${Math.max(2, (cosines[i] - 0.9) * 600)}px`, "aria-hidden": "true" }),
        ` ${cosines[i].toFixed(4)}`) : "—"],
      ["nearest token", (i) => nearest[i] ? JSON.stringify(nearest[i].text) : "—"],
      ["its cosine", (i) => nearest[i] ? nearest[i].cosine.toFixed(4) : "—", { num: true }],
    ], [...Array(Math.max(cosines.length, nearest.length)).keys()]),
    h("h2", {}, "Evaluations"),
    version.evaluations.length ? table("Scores recorded with this version", [
      ["data", (e) => (e.data && e.data.name) || "—"], ["examples", (e) => (e.data && e.data.examples) ?? "—", { num: true }],
      ["metric", (e) => e.metric || "—"], ["score", (e) => pct(e.score), { num: true }],
      ["95 % interval", (e) => interval(e.ci95)], ["when", (e) => e.at || "—"],
    ], version.evaluations) : h("p", { class: "muted" }, "No evaluation recorded yet (Compare runs one)."),
  );
  return { title: version.id };
}
