// Prompts: every name with its versions and aliases; moving an alias, deleting a version (admin).
import { api } from "./api.js";
import { errorBox, field, h, notify, pct, refresh, table } from "./dom.js";

export async function render(main) {
  const { prompts, aliases } = await api("/prompts");
  const versions = prompts.flatMap((p) => p.versions.map((v) => v.id));

  async function act(work, done) {
    notify();
    try {
      await work();
      refresh();
      notify(h("p", { class: "ok" }, done));
    } catch (error) {
      notify(errorBox(error));
    }
  }

  main.append(h("h1", {}, "Prompts"));
  if (!prompts.length) main.append(h("p", {}, "No prompt is published yet: train one on the Jobs page."));
  for (const prompt of prompts) {
    main.append(h("section", { "aria-labelledby": `name-${prompt.name}` },
      h("h2", { id: `name-${prompt.name}` }, prompt.name,
        h("span", { class: "muted" }, ` · newest ${prompt.latest}`,
          prompt.aliases.length ? ` · aliases ${prompt.aliases.join(", ")}` : "")),
      table(`Versions of ${prompt.name}`, [
        ["version", (v) => h("a", { href: `#/prompts/${encodeURIComponent(v.id)}` }, v.id)],
        ["created", (v) => v.created_at || "—"],
        ["model", (v) => v.base_model || "—"],
        ["vectors", (v) => `${v.num_virtual_tokens} × ${v.hidden_size}`, { num: true }],
        ["validation before → after", (v) => v.metrics && v.metrics.val_after !== undefined
          ? `${pct(v.metrics.val_before)} → ${pct(v.metrics.val_after)}` : "—"],
        ["aliases", (v) => Object.entries(aliases).filter(([, t]) => t === v.id).map(([a]) => a).join(", ") || "—"],
        ["", (v) => h("button", {
          type: "button", "aria-label": `Delete ${v.id}`,
          onclick: () => confirm(`Delete ${v.id}? Aliases pointing at it are removed too.`) &&
            act(() => api(`/prompts/${encodeURIComponent(v.id)}?force=true`, { method: "DELETE" }), `Deleted ${v.id}.`),
        }, "Delete")],
      ], prompt.versions)));
  }
  const alias = h("input", { id: "alias-name", required: true, pattern: "[a-z0-9][a-z0-9_-]*", placeholder: "math-prod" });
  const target = h("select", { id: "alias-target", required: true }, versions.map((id) => h("option", { value: id }, id)));
  main.append(h("section", { "aria-labelledby": "aliases" },
    h("h2", { id: "aliases" }, "Aliases"),
    table("Aliases and the version each points at", [
      ["alias", ([a]) => a], ["version", ([, t]) => h("a", { href: `#/prompts/${encodeURIComponent(t)}` }, t)],
      ["", ([a]) => h("button", {
        type: "button", "aria-label": `Remove alias ${a}`,
        onclick: () => act(() => api(`/aliases/${encodeURIComponent(a)}`, { method: "DELETE" }), `Removed ${a}.`),
      }, "Remove")],
    ], Object.entries(aliases)),
    h("form", {
      class: "stack", "aria-label": "Point an alias at a version",
      onsubmit: (event) => {
        event.preventDefault();
        act(() => api(`/aliases/${encodeURIComponent(alias.value)}`, { method: "PUT", json: { target: target.value } }),
          `${alias.value} now points at ${target.value}.`);
      },
    },
    field("Alias", alias),
    field("Version", target),
    h("button", { type: "submit" }, "Point the alias here"))));
  return { title: "Prompts" };
}
