// Jobs: training and evaluation jobs with live progress (Server-Sent Events), cancel, and a form
// that starts a training job from an uploaded file.
import { ApiError, api, stream } from "./api.js";
import { errorBox, field, h, notify, pct, refresh, table } from "./dom.js";

function progressCell(job) {
  const bar = h("progress", { max: Math.max(1, job.total || 1), value: job.step || 0,
    "aria-label": `${job.id} progress` });
  const text = h("span", { class: "muted" },
    ` ${job.step || 0}/${job.total || "?"}` + (job.loss !== null && job.loss !== undefined ? ` loss ${job.loss.toFixed(3)}` : "") +
    (job.val_metric !== null && job.val_metric !== undefined ? ` validation ${pct(job.val_metric)}` : ""));
  return h("span", { "data-progress": job.id }, bar, text);
}

export async function render(main) {
  const message = h("div", { "aria-live": "polite" });
  const controllers = [];
  const train = (await api("/train")).jobs;
  let evals = [];
  let evalNote = "";
  try {
    evals = (await api("/eval")).jobs;
  } catch (error) {
    if (!(error instanceof ApiError) || ![401, 403].includes(error.status)) throw error;
    evalNote = `Evaluation jobs need the admin key (${error.message})`;
  }

  async function cancel(kind, id) {
    try {
      await api(`/${kind}/${id}/cancel`, { method: "POST" });
      message.replaceChildren(h("p", { class: "ok" }, `Cancel requested for ${id}.`));
    } catch (error) {
      message.replaceChildren(errorBox(error));
    }
  }

  const stateCell = (job) => h("span", { "data-state": job.id }, job.state,
    job.version ? h("span", {}, " → ", h("a", { href: `#/prompts/${encodeURIComponent(job.version)}` }, job.version)) : "",
    job.error ? h("span", { class: "error" }, ` ${job.error}`) : "");
  const cancelCell = (kind) => (job) => ["queued", "running"].includes(job.state)
    ? h("button", { type: "button", "aria-label": `Cancel ${job.id}`, onclick: () => cancel(kind, job.id) }, "Cancel") : "";

  function follow(kind, job) {
    const controller = new AbortController();
    controllers.push(controller);
    stream(`/${kind}/${job.id}/events`, {
      signal: controller.signal,
      onEvent: (name, data) => {
        const progress = main.querySelector(`[data-progress="${job.id}"]`);
        const state = main.querySelector(`[data-state="${job.id}"]`);
        if (progress) progress.replaceWith(progressCell(data));
        if (state) state.replaceWith(stateCell(data));
      },
    }).catch(() => {});
  }

  const file = h("input", { id: "train-file", type: "file", accept: ".jsonl,.json,.txt", required: true });
  const name = h("input", { id: "train-name", required: true, pattern: "[a-z0-9][a-z0-9_-]*", placeholder: "sentiment" });
  const init = h("textarea", { id: "train-init", required: true, placeholder: "Classify the sentiment of this review." });
  const steps = h("input", { id: "train-steps", type: "number", min: 1, value: 100 });
  const lr = h("input", { id: "train-lr", type: "number", step: "any", min: 0, placeholder: "0.003" });
  const task = h("select", { id: "train-task" }, ["auto", "classification", "generation"].map((t) => h("option", { value: t }, t)));

  async function start(event) {
    event.preventDefault();
    const form = new FormData();
    form.append("file", file.files[0]);
    form.append("name", name.value);
    form.append("init", init.value);
    form.append("steps", steps.value);
    form.append("task", task.value);
    if (lr.value) form.append("lr", lr.value);
    try {
      const job = await api("/train", { method: "POST", form });
      refresh();
      notify(h("p", { class: "ok" }, `Training job ${job.id} queued.`));
    } catch (error) {
      message.replaceChildren(errorBox(error));
    }
  }

  main.append(
    h("h1", {}, "Jobs"), message,
    table("Training jobs, newest first", [
      ["job", (j) => j.id], ["prompt", (j) => j.name], ["state", stateCell], ["progress", progressCell],
      ["created", (j) => j.created_at], ["", cancelCell("train")],
    ], train),
    evalNote ? h("p", { class: "muted" }, evalNote) : table("Evaluation jobs, newest first", [
      ["job", (j) => j.id], ["state", stateCell], ["progress", progressCell],
      ["scores", (j) => ((j.metrics && j.metrics.results) || []).map((r) => `${r.reference}: ${pct(r.score)}`).join("; ")],
      ["created", (j) => j.created_at], ["", cancelCell("eval")],
    ], evals),
    h("h2", {}, "Start a training job"),
    h("form", { class: "stack", onsubmit: start, "aria-label": "Start a training job" },
      field("Training data (JSONL, {\"input\", \"output\"} per line)", file),
      field("Prompt name to publish", name),
      field("Init text (its token embeddings start the prompt)", init),
      field("Steps", steps),
      field("Learning rate (empty: the default)", lr),
      field("Task", task),
      h("button", { type: "submit" }, "Start training")),
  );
  for (const job of train) if (["queued", "running"].includes(job.state)) follow("train", job);
  for (const job of evals) if (["queued", "running"].includes(job.state)) follow("eval", job);
  return { title: "Jobs", leave: () => controllers.forEach((c) => c.abort()) };
}
