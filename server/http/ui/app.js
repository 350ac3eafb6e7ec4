// The console's shell: the admin key field, the hash router and the page modules.
import { adminKey, setAdminKey } from "./api.js";
import { errorBox } from "./dom.js";
import * as compare from "./compare.js";
import * as jobs from "./jobs.js";
import * as playground from "./playground.js";
import * as prompts from "./prompts.js";
import * as version from "./version.js";

const ROUTES = [
  [/^#\/prompts\/([^/]+)$/, version],
  [/^#\/compare$/, compare],
  [/^#\/jobs$/, jobs],
  [/^#\/playground$/, playground],
  [/^#\/prompts$/, prompts],
];

let leaving = null; // the page's cleanup (streams to close) when another page is shown
let turn = 0; // only the newest page drawn reaches the screen

async function show() {
  const mine = ++turn;
  const hash = location.hash || "#/prompts";
  const [pattern, page] = ROUTES.find(([re]) => re.test(hash)) || ROUTES[ROUTES.length - 1];
  const params = (hash.match(pattern) || []).slice(1).map(decodeURIComponent);
  if (leaving) leaving();
  leaving = null;
  for (const link of document.querySelectorAll("nav a")) {
    link.toggleAttribute("aria-current", hash.startsWith(link.getAttribute("href")));
    if (link.hasAttribute("aria-current")) link.setAttribute("aria-current", "page");
  }
  const main = document.getElementById("page");
  document.getElementById("status").replaceChildren();
  const content = document.createElement("div"); // drawn aside, shown whole once ready
  try {
    const result = await page.render(content, ...params);
    if (mine !== turn) { if (result.leave) result.leave(); return; }
    document.title = `${result.title} · softprompt console`;
    leaving = result.leave || null;
  } catch (error) {
    if (mine !== turn) return;
    document.title = "Error · softprompt console";
    content.replaceChildren(errorBox(error));
  }
  main.replaceChildren(content);
  main.focus();
}

function showKeyState() {
  document.getElementById("key-state").textContent = adminKey() ? "key set for this tab" : "read-only";
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("admin-key");
  setAdminKey(input.value.trim());
  input.value = "";
  showKeyState();
  show();
});
window.addEventListener("hashchange", show);
window.addEventListener("softprompt:refresh", show);
showKeyState();
show();
