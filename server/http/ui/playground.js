// Playground: one input sent to several versions (and the bare model), answers streamed side by side.
import { api, stream } from "./api.js";
import { errorBox, field, h } from "./dom.js";

export async function render(main) {
  const { prompts, aliases } = await api("/prompts");
  const refs = [...prompts.flatMap((p) => p.versions.map((v) => v.id)), ...Object.keys(aliases)];
  const input = h("textarea", { id: "play-input", required: true, placeholder: "A gorgeous, witty and moving film." });
  const maxNew = h("input", { id: "play-max-new", type: "number", min: 1, max: 512, value: 32 });
  const bare = h("input", { type: "checkbox", name: "ref", value: "", checked: true });
  const cards = h("div", { class: "cards", "aria-live": "polite" });
  const controllers = [];

  function ask(ref, prompt, tokens) {
    const text = h("pre", { "data-answer": ref || "(bare model)" });
    const note = h("p", { class: "muted" }, "…");
    cards.append(h("section", { class: "card", "aria-label": `answer of ${ref || "the bare model"}` },
      h("h2", {}, ref || "(bare model)"), text, note));
    const controller = new AbortController();
    controllers.push(controller);
    const query = ref ? `?prompt=${encodeURIComponent(ref)}&stream=true` : "?stream=true";
    stream(`/generate${query}`, {
      method: "POST", json: { input: prompt, max_new_tokens: tokens }, signal: controller.signal,
      onEvent: (name, data) => {
        if (name === "token") text.textContent += data.text;
        else if (name === "done") {
          text.textContent = data.text;
          note.textContent = `${data.prompt || "bare model"}, ${data.finish_reason}, ` +
            `${data.usage.completion_tokens} tokens in ${Math.round(data.timings.total_ms)} ms`;
        } else if (name === "error") note.replaceWith(errorBox(Object.assign(new Error(data.error.message), data.error)));
      },
    }).catch((error) => { if (error.name !== "AbortError") note.replaceWith(errorBox(error)); });
  }

  function send(event) {
    event.preventDefault();
    controllers.splice(0).forEach((c) => c.abort());
    cards.replaceChildren();
    for (const box of main.querySelectorAll("input[name=ref]:checked")) ask(box.value, input.value, Number(maxNew.value));
  }

  main.append(
    h("h1", {}, "Playground"),
    h("form", { class: "stack", onsubmit: send, "aria-label": "Ask several prompts the same thing" },
      field("Input", input),
      h("fieldset", {}, h("legend", {}, "Answer with"),
        h("label", {}, bare, " the bare model"),
        refs.map((ref) => h("label", {}, h("input", { type: "checkbox", name: "ref", value: ref }), ` ${ref}`))),
      field("Max new tokens", maxNew),
      h("button", { type: "submit" }, "Send")),
    cards);
  return { title: "Playground", leave: () => controllers.forEach((c) => c.abort()) };
}
