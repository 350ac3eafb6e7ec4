// Compare: score versions, text prompts and the bare model on one labeled file (POST /eval),
// watch the job, then the table with intervals, the paired tests and where they disagree.
import { api, stream } from "./api.js";
import { errorBox, field, h, interval, pct, table } from "./dom.js";

function results(main, job) {
  const t = job.table;
  const labels = t.results.map((r) => r.reference);
  const disagree = (t.examples || []).filter((e) => new Set(labels.map((l) => e.correct[l])).size > 1);
  main.append(
    h("h2", {}, "Result"),
    h("p", {}, `${t.data.name}: ${t.data.examples} examples, ${t.task}, ${t.metric}` +
      (t.max_new_tokens ? `, up to ${t.max_new_tokens} new tokens` : "")),
    table("Scores with 95 % intervals", [
      ["reference", (r) => r.reference], ["score", (r) => pct(r.score), { num: true }],
      ["95 % interval", (r) => interval(r.ci95)], ["correct", (r) => `${r.correct}/${r.n}`, { num: true }],
    ], t.results),
    t.comparisons.length ? table("Paired (McNemar's exact test on the examples where the two disagree)", [
      ["A", (c) => c.a], ["B", (c) => c.b],
      ["difference", (c) => `${(100 * c.difference).toFixed(1)} points`, { num: true }],
      ["only A / only B", (c) => `${c.only_a} / ${c.only_b}`, { num: true }],
      ["p", (c) => (c.p_value >= 0.001 ? c.p_value.toFixed(3) : c.p_value.toExponential(1)), { num: true }],
    ], t.comparisons) : "",
    table(`Examples where they disagree (${disagree.length})`, [
      ["input", (e) => e.input], ["expected", (e) => e.output],
      ...labels.map((l) => [l, (e) => `${e.correct[l] ? "✓" : "✗"} ${e.predicted[l]}`]),
    ], disagree.slice(0, 50)),
  );
}

export async function render(main) {
  const { prompts } = await api("/prompts");
  const message = h("div", { "aria-live": "polite" });
  const progress = h("progress", { max: 1, value: 0, "aria-label": "evaluation progress" });
  const out = h("div");
  const choices = prompts.flatMap((p) => p.versions.map((v) => v.id));
  const file = h("input", { id: "eval-file", type: "file", accept: ".jsonl,.json,.txt", required: true });
  const texts = h("textarea", { id: "eval-texts", placeholder: "one text prompt per line" });
  const bare = h("input", { id: "eval-bare", type: "checkbox" });
  const maxNew = h("input", { id: "eval-max-new", type: "number", min: 1, max: 256, placeholder: "from the prompt" });
  let controller = null;

  async function submit(event) {
    event.preventDefault();
    message.replaceChildren();
    out.replaceChildren();
    const form = new FormData();
    form.append("file", file.files[0]);
    for (const box of main.querySelectorAll("input[name=version]:checked")) form.append("prompt", box.value);
    for (const text of texts.value.split("\n").map((s) => s.trim()).filter(Boolean)) form.append("text", text);
    if (bare.checked) form.append("bare", "true");
    if (maxNew.value) form.append("max_new_tokens", maxNew.value);
    try {
      const job = await api("/eval", { method: "POST", form });
      message.replaceChildren(h("p", {}, `Evaluation job ${job.id} queued.`), progress);
      controller = new AbortController();
      await stream(`/eval/${job.id}/events`, {
        signal: controller.signal,
        onEvent: (name, data) => {
          if (data.total) { progress.max = data.total; progress.value = data.step; }
          message.firstChild.textContent = `Evaluation job ${job.id}: ${data.state}` +
            (data.total ? ` (${data.step}/${data.total})` : "");
        },
      });
      const done = await api(`/eval/${job.id}`);
      if (done.state !== "succeeded") throw Object.assign(new Error(done.error || done.state), { code: done.state });
      results(out, done);
    } catch (error) {
      if (error.name !== "AbortError") message.replaceChildren(errorBox(error));
    }
  }

  main.append(
    h("h1", {}, "Compare"),
    h("form", { class: "stack", onsubmit: submit, "aria-label": "Compare prompts on labeled data" },
      h("fieldset", {}, h("legend", {}, "Versions"),
        choices.length ? choices.map((id) => h("label", {},
          h("input", { type: "checkbox", name: "version", value: id }), ` ${id}`)) : h("p", {}, "No version yet.")),
      field("Text prompts", texts),
      h("label", { for: "eval-bare" }, h("span", {}, bare, " also the bare model (no prompt)")),
      field("Labeled JSONL ({\"input\", \"output\"} per line)", file),
      field("Max new tokens (generation tasks)", maxNew),
      h("button", { type: "submit" }, "Run the comparison")),
    message, out);
  return { title: "Compare", leave: () => controller && controller.abort() };
}
