"""Check every TensorRT and cuda-python name a source file uses against the real bindings.

Run in a subprocess whose ``sys.path`` holds one TensorRT bindings wheel and one cuda-bindings
wheel (``scripts/trt_bindings.py`` lays them out; test_trt_names.py drives this):

    python trt_names.py < {"files": {"name": "source", ...}}   ->   JSON on stdout

It follows values by their types through each file: ``trt`` / ``import tensorrt`` and
``rt`` / ``from cuda.bindings import runtime`` are the modules; a class called gives an
instance; a method's return type is read from the binding's own signature line
(``create_builder_config(self: tensorrt.Builder) -> tensorrt.IBuilderConfig``) and a cuda-python
function's from its "Returns" section (``prop : cudaDeviceProp``); ``self.x = ...`` and
arguments passed to the file's own functions carry types across functions. Every attribute,
enum member and method reached that way must exist (``getattr(x, "n", default)`` and
``hasattr`` are optional uses, reported but not required), and every call of a binding
function must fit one of its signatures (positional count, keyword names, required
parameters). Imports nothing from edgediff.
"""
from __future__ import annotations

import ast
import json
import re
import sys

try:
    import tensorrt as TRT
except ImportError:
    import tensorrt_bindings as TRT
from cuda.bindings import runtime as CUDART

UNWRAP = {"cuda_call"}          # the file's helper that turns (err, value) into value


class Mod:
    """A module, class, enum member or function reached from a binding module."""
    def __init__(self, obj, label): self.obj, self.label = obj, label


class Inst:
    def __init__(self, cls): self.cls = cls


class Method:
    def __init__(self, cls, name): self.cls, self.name = cls, name


class Tup:
    def __init__(self, items): self.items = items


class Record:
    """An instance of one of the file's own dataclasses: its fields' types."""
    def __init__(self, fields): self.fields = fields


def _split(params: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in params:
        depth += ch in "([{<"
        depth -= ch in ")]}>"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in out + [cur] if p.strip()]


def signatures(obj, name: str) -> list[tuple[list[tuple[str, bool]], str]]:
    """[(params [(name, has_default)], return annotation)] from the binding's docstring."""
    sigs = []
    for line in (getattr(obj, "__doc__", None) or "").splitlines():
        m = re.match(rf"\s*(?:\d+\.\s+)?{re.escape(name)}\((.*)\)\s*(?:->\s*(.+))?$", line)
        if not m or m.group(1).startswith("*args"):
            continue
        params = []
        for p in _split(m.group(1)):
            if p.startswith("*"):
                params.append(("*", True))
                continue
            head = p.split("=")[0].split(":")[0].strip()
            params.append((head.split()[-1], "=" in p))
        if params and params[0][0] == "self":
            params = params[1:]
        sigs.append((params, m.group(2) or ""))
    return sigs


def cuda_returns(func) -> list[str]:
    """Type names of a cuda-python function's returned tuple (``cudaError_t``, ``cudaDeviceProp`` ...)."""
    doc = getattr(func, "__doc__", None) or ""
    section = doc.split("Returns\n-------\n", 1)[1] if "Returns\n-------\n" in doc else ""
    section = re.split(r"\n\s*\w[\w ]*\n-{3,}", section)[0]          # up to the next heading
    names = []
    for line in section.splitlines():
        if not line.strip() or line.startswith(" "):
            continue
        m = re.search(r"~\.(\w+)`?\s*$", line) or re.match(r"(\w+)\s*$", line)
        names.append(m.group(1) if m else "")
    return names


class Checker:
    def __init__(self, filename: str, tree: ast.Module):
        self.filename, self.tree = filename, tree
        self.refs: dict[tuple, dict] = {}
        self.self_attrs: dict[str, object] = {}
        self.params: dict[str, dict[str, object]] = {}
        self.returns: dict[str, object] = {}
        self.funcs = {f.name: f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.classes = {c.name: [s.target.id for s in c.body if isinstance(s, ast.AnnAssign)
                                 and isinstance(s.target, ast.Name)] for c in ast.walk(tree) if isinstance(c, ast.ClassDef)}
        self.module_env = {"trt": Mod(TRT, "trt"), "rt": Mod(CUDART, "cudart")}

    # -- recording
    def record(self, node, label: str, ok: bool, optional: bool = False, why: str = "") -> None:
        key = (label, node.lineno)
        self.refs[key] = {"name": label, "file": self.filename, "line": node.lineno, "ok": ok, "optional": optional,
                          "why": why}

    # -- types
    def attribute(self, node, base, attr: str, optional: bool = False):
        if isinstance(base, Record):
            return base.fields.get(attr)
        if isinstance(base, Mod):
            label = f"{base.label}.{attr}"
            found = hasattr(base.obj, attr)
            self.record(node, label, found, optional)
            return Mod(getattr(base.obj, attr), label) if found else None
        if isinstance(base, Inst):
            label = f"{base.cls.__name__}.{attr}"
            found = hasattr(base.cls, attr)
            self.record(node, label, found, optional)
            if not found:
                return None
            member = getattr(base.cls, attr)
            return None if isinstance(member, property) or not callable(member) else Method(base.cls, attr)
        return None

    def call(self, node: ast.Call, env):
        func = node.func
        args = [self.expr(a, env) for a in node.args]
        for k in node.keywords:
            self.expr(k.value, env)
        if isinstance(func, ast.Name) and func.id in ("getattr", "hasattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            optional = func.id == "hasattr" or len(node.args) > 2
            got = self.attribute(node, args[0], node.args[1].value, optional)
            return got if func.id == "getattr" else None
        if isinstance(func, ast.Name) and func.id in UNWRAP and args and isinstance(args[0], Tup):
            values = args[0].items[1:]
            return values[0] if len(values) == 1 else Tup(values)
        local = func.id if isinstance(func, ast.Name) else (
            func.attr if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            and func.value.id == "self" else None)
        if isinstance(func, ast.Name) and func.id in self.classes:
            fields = dict(zip(self.classes[func.id], args))
            fields.update({k.arg: self.expr(k.value, env) for k in node.keywords if k.arg})
            return Record(fields)
        if local in self.funcs:
            self.bind(self.funcs[local], args, node)
            return self.returns.get(local)
        target = self.expr(func, env)
        if isinstance(target, Mod):
            if isinstance(target.obj, type):
                return Inst(target.obj)
            if callable(target.obj):
                name = target.label.rsplit(".", 1)[-1]
                self.check_call(node, target.label, target.obj, name)
                if target.label.startswith("cudart."):
                    return Tup([Inst(getattr(CUDART, n)) if isinstance(getattr(CUDART, n, None), type) else None
                                for n in cuda_returns(target.obj)])
        if isinstance(target, Method):
            ret = self.check_call(node, f"{target.cls.__name__}.{target.name}", getattr(target.cls, target.name),
                                  target.name)
            m = re.search(r"tensorrt\.(\w+)", ret or "")
            cls = getattr(TRT, m.group(1), None) if m else None
            return Inst(cls) if isinstance(cls, type) else None
        return None

    def check_call(self, node: ast.Call, label: str, obj, name: str) -> str | None:
        """Record whether the call fits a signature; the fitting one's return annotation."""
        sigs = signatures(obj, name)
        if not sigs or any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return sigs[0][1] if sigs else None
        npos, kws = len(node.args), [k.arg for k in node.keywords]
        for params, ret in sigs:
            if any(p == "*" for p, _ in params):
                return ret
            names = [p for p, _ in params]
            if npos <= len(params) and all(k in names[npos:] for k in kws) and \
                    all(i < npos or p in kws or has_default for i, (p, has_default) in enumerate(params)):
                self.record(node, f"{label}()", True)
                return ret
        shown = " | ".join(f"({', '.join(p for p, _ in params)})" for params, _ in sigs)
        self.record(node, f"{label}()", False, why=f"called with {npos} positional and {kws}; takes {shown}")
        return None

    def bind(self, fdef, args, node) -> None:
        params = [a.arg for a in fdef.args.args]
        if params and params[0] == "self":
            params = params[1:]
        slot = self.params.setdefault(fdef.name, {})
        for name, t in zip(params, args):
            if t is not None:
                slot[name] = t

    def expr(self, node, env):
        if node is None:
            return None
        if isinstance(node, ast.Name):
            return env.get(node.id, self.module_env.get(node.id))
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return self.self_attrs.get(node.attr)
            return self.attribute(node, self.expr(node.value, env), node.attr)
        if isinstance(node, ast.Call):
            return self.call(node, env)
        if isinstance(node, ast.Tuple):
            return Tup([self.expr(e, env) for e in node.elts])
        if isinstance(node, ast.IfExp):
            self.expr(node.test, env)
            body, orelse = self.expr(node.body, env), self.expr(node.orelse, env)
            return body if body is not None else orelse
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child, env)
            elif isinstance(child, ast.comprehension):
                self.expr(child.iter, env)
                for cond in child.ifs:
                    self.expr(cond, env)
        return None

    def assign(self, target, value, env) -> None:
        if isinstance(target, ast.Name):
            if value is not None:
                env[target.id] = value
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            if value is not None:
                self.self_attrs[target.attr] = value
        elif isinstance(target, ast.Attribute):
            self.attribute(target, self.expr(target.value, env), target.attr)
        elif isinstance(target, (ast.Tuple, ast.List)):
            items = value.items if isinstance(value, Tup) else [None] * len(target.elts)
            for t, v in zip(target.elts, items):
                self.assign(t, v, env)

    def statements(self, body, env, fname: str) -> None:
        for st in body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue                                  # analysed on their own
            if isinstance(st, ast.Assign):
                value = self.expr(st.value, env)
                for t in st.targets:
                    self.assign(t, value, env)
            elif isinstance(st, (ast.AnnAssign, ast.AugAssign)):
                self.assign(st.target, self.expr(st.value, env), env)
            elif isinstance(st, ast.Import):
                for a in st.names:
                    if a.name == "tensorrt":
                        env[a.asname or a.name] = Mod(TRT, "trt")
            elif isinstance(st, ast.ImportFrom):
                for a in st.names:
                    if st.module == "cuda.bindings" and a.name == "runtime":
                        env[a.asname or a.name] = Mod(CUDART, "cudart")
            elif isinstance(st, ast.Return):
                value = self.expr(st.value, env)
                if value is not None:                     # later passes know more: the latest wins
                    self.returns[fname] = value
            elif isinstance(st, ast.With):
                for item in st.items:
                    self.assign(item.optional_vars, self.expr(item.context_expr, env), env) \
                        if item.optional_vars is not None else self.expr(item.context_expr, env)
            else:
                for field in ("test", "iter", "value", "exc", "subject"):
                    self.expr(getattr(st, field, None), env)
            for block in ("body", "orelse", "finalbody"):
                if isinstance(getattr(st, block, None), list) and not isinstance(st, ast.ClassDef):
                    self.statements(getattr(st, block), env, fname)
            for handler in getattr(st, "handlers", []):
                self.statements(handler.body, env, fname)

    def run(self) -> list[dict]:
        for _ in range(5):                                # types flow through calls and self.x
            for fdef in self.funcs.values():
                env = dict(self.params.get(fdef.name, {}))
                self.statements(fdef.body, env, fdef.name)
        self.statements(self.tree.body, {}, "<module>")
        return list(self.refs.values())


def check(files: dict[str, str], names: dict[str, list[str]] | None = None) -> dict:
    """``files``: sources to follow; ``names``: plain lists to look up, {"cudart" or a TensorRT
    class: [attribute, ...]} (what the tests' stand-ins imitate)."""
    refs = []
    for name, source in files.items():
        refs += Checker(name, ast.parse(source, name)).run()
    missing = [f"{r['file']}:{r['line']}: {r['name']} {r['why']}".rstrip()
               for r in refs if not r["ok"] and not r["optional"]]
    for owner, attrs in (names or {}).items():
        obj = CUDART if owner == "cudart" else getattr(TRT, owner, None)
        missing += [f"stand-in: {owner}.{a}" for a in attrs if obj is None or not hasattr(obj, a)]
    return {"tensorrt": TRT.__version__, "cuda_bindings": _cuda_version(), "refs": refs, "missing": missing}


def _cuda_version() -> str:
    from importlib.metadata import version
    return version("cuda-bindings")


if __name__ == "__main__":
    request = json.load(sys.stdin)
    print(json.dumps(check(request["files"], request.get("names"))))
