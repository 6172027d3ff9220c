// Runs the browser core's tests (tests/unit/frontend/test_core_*.py) under MicroPython 1.27, the
// interpreter the page uses by default, in Node: no browser needed.
//
// Every .py under frontend/tokenwire/ goes to /lib/tokenwire/ in MicroPython's file system and
// every test module to /lib/; each module's test_* functions run in name order (MicroPython's
// dicts do not keep definition order). Prints a traceback per failure and ends with exactly one
// line "N passed, M failed". Exit code 1 if anything failed or no test ran.
//
//     node tests/unit/frontend/run_micropython.mjs

import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, sep } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..", "..");
const interpreter = join(
  root,
  "frontend",
  "node_modules",
  "@micropython",
  "micropython-webassembly-pyscript",
  "micropython.mjs",
);

if (!existsSync(interpreter)) {
  console.log(`MicroPython not found at ${interpreter}: run \`npm ci --prefix frontend\``);
  console.log("0 passed, 1 failed");
  process.exit(1);
}

function pythonFiles(dir) {
  const found = [];
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) {
      if (name !== "__pycache__") found.push(...pythonFiles(path));
    } else if (name.endsWith(".py")) {
      found.push(path);
    }
  }
  return found;
}

function mkdirs(fs, path) {
  let current = "";
  for (const part of path.split("/").filter(Boolean)) {
    current += "/" + part;
    if (!fs.analyzePath(current).exists) fs.mkdir(current);
  }
}

const { loadMicroPython } = await import(pathToFileURL(interpreter).href);
const mp = await loadMicroPython({
  stdout: (line) => process.stdout.write(line + "\n"),
  stderr: (line) => process.stderr.write(line + "\n"),
});

const packageDir = join(root, "frontend", "tokenwire");
for (const path of pythonFiles(packageDir)) {
  const target = "/lib/tokenwire/" + relative(packageDir, path).split(sep).join("/");
  mkdirs(mp.FS, target.slice(0, target.lastIndexOf("/")));
  mp.FS.writeFile(target, readFileSync(path, "utf8"));
}

const modules = [];
mkdirs(mp.FS, "/lib");
for (const name of readdirSync(here).sort()) {
  if (name.startsWith("test_core_") && name.endsWith(".py")) {
    mp.FS.writeFile("/lib/" + name, readFileSync(join(here, name), "utf8"));
    modules.push(name.slice(0, -3));
  }
}

const driver = `
import sys
if "/lib" not in sys.path:
    sys.path.append("/lib")
_passed = 0
_failed = 0
for _module_name in ${JSON.stringify(modules)}:
    try:
        _module = __import__(_module_name)
    except BaseException as error:
        _failed += 1
        print("FAILED " + _module_name + " (import): " + repr(error))
        sys.print_exception(error)
        continue
    for _name in sorted([n for n in dir(_module) if n.startswith("test_")]):
        _test = getattr(_module, _name)
        if not callable(_test):
            continue
        try:
            _test()
            _passed += 1
        except BaseException as error:
            _failed += 1
            print("FAILED " + _module_name + "::" + _name + ": " + repr(error))
            sys.print_exception(error)
`;

let passed = 0;
let failed = 0;
try {
  mp.runPython(driver);
  passed = mp.globals.get("_passed");
  failed = mp.globals.get("_failed");
} catch (error) {
  // A Python error outside any test (e.g. in the driver); don't dump the minified module.
  console.log(`runner error: ${error.name}: ${error.message}`);
  failed += 1;
}
if (passed === 0 && failed === 0) console.log("no tests ran: expected tests/unit/frontend/test_core_*.py");
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed > 0 || passed === 0 ? 1 : 0);
