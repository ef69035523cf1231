"""JSON read as it is generated: `JsonScanner` checks text a character at a time as the beginning
of one JSON value and tells where the values inside it begin and end; `JsonCalls` reads the tool
calls such a value holds (a call object {"name": ..., "arguments": {...}[, "id": ...]} or a list
of them: Hermes blocks, Mistral's v2-v7 [TOOL_CALLS] lists) as the formats stream them.

Arguments stream as the model wrote them: the text of the arguments object, a character once it is
known to be valid JSON so far. What a call's fragments add up to is its `ToolCall.arguments_json`,
which is what the non-streamed response returns, so a client that concatenates the fragments gets
the same JSON text as one that does not stream."""

from __future__ import annotations

import json

from mistral_jax.tool_calls.call import ToolCall, call_id_or_new
from mistral_jax.tool_calls.format import ArgumentsText, CallBegins, CallEnds, Piece

WHITESPACE = " \t\n\r"

# What the scanner expects next.
_VALUE, _FIRST_VALUE_OR_CLOSE, _FIRST_KEY_OR_CLOSE, _KEY, _COLON, _AFTER = range(6)
_STRING, _ESCAPE, _UNICODE, _NUMBER, _LITERAL = range(6, 11)

# Number states (RFC 8259: -? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?) and the ones a number may end in.
_MINUS, _ZERO, _INT, _DOT, _FRAC, _E, _E_SIGN, _EXP = range(8)
_NUMBER_ENDS = {_ZERO, _INT, _FRAC, _EXP}


class JsonScanner:
    """Checks text, a character at a time, as the beginning of one JSON value (RFC 8259; no NaN,
    no trailing commas), and tells where the values inside it begin and end.

    After each push: `error` (the text so far begins no JSON value: push reads nothing more),
    `done` (the value is whole: push reads nothing more; the top-level value is a container or a
    string here, so it ends at its own last character), and `events`, the values that began or
    ended at that character: ("begin", depth, key, start, first character) and ("end", depth,
    key, start, stop), text[start:stop] being the value's text. depth 0 is the whole value; key is
    the member name of a value in an object, None elsewhere. A number ends at the character that
    shows it is over (its stop is before that character).

    State: the text read, a stack of open containers [kind "{" or "[", member key, member start],
    and the state of the value being read (string escapes, number, literal)."""

    def __init__(self):
        self.text = ""
        self.error = self.done = False
        self.events: list[tuple] = []
        self._stack: list[list] = []
        self._state = _VALUE
        self._start = 0  # where the scalar being read began
        self._key_start: int | None = None  # where the key being read began (None: a string value)
        self._hex = 0  # \uXXXX digits still to come
        self._number = _MINUS
        self._literal = ""  # what a true/false/null still needs

    def push(self, ch: str) -> None:
        self.events = []
        if self.error or self.done:
            return
        i = len(self.text)
        self.text += ch
        if self._state == _NUMBER and not self._number_step(ch):
            if self._number not in _NUMBER_ENDS:
                return self._fail()
            self._end_scalar(i)  # the number ended before ch, which is read as what follows it
        if not self._step(ch, i):
            self._fail()

    # -- the states --

    def _step(self, ch: str, i: int) -> bool:
        state = self._state
        if state == _STRING:
            if ch == '"':
                self._end_string(i)
            elif ch == "\\":
                self._state = _ESCAPE
            elif ord(ch) < 0x20:
                return False
            return True
        if state == _ESCAPE:
            if ch == "u":
                self._state, self._hex = _UNICODE, 4
                return True
            self._state = _STRING
            return ch in '"\\/bfnrt'
        if state == _UNICODE:
            self._hex -= 1
            if self._hex == 0:
                self._state = _STRING
            return ch in "0123456789abcdefABCDEF"
        if state == _NUMBER:
            return True  # read by _number_step
        if state == _LITERAL:
            if ch != self._literal[0]:
                return False
            self._literal = self._literal[1:]
            if not self._literal:
                self._end_scalar(i + 1)
            return True
        if ch in WHITESPACE:
            return True
        if state in (_VALUE, _FIRST_VALUE_OR_CLOSE):
            if state == _FIRST_VALUE_OR_CLOSE and ch == "]":
                return self._close(i, "[")
            return self._begin_value(ch, i)
        if state in (_FIRST_KEY_OR_CLOSE, _KEY):
            if state == _FIRST_KEY_OR_CLOSE and ch == "}":
                return self._close(i, "{")
            if ch != '"':
                return False
            self._state, self._key_start = _STRING, i
            return True
        if state == _COLON:
            self._state = _VALUE
            return ch == ":"
        # _AFTER: a value ended inside a container
        kind = self._stack[-1][0]
        if ch == ",":
            self._state = _KEY if kind == "{" else _VALUE
            return True
        return self._close(i, kind) if ch == ("}" if kind == "{" else "]") else False

    def _begin_value(self, ch: str, i: int) -> bool:
        self.events.append(("begin", len(self._stack), self._key(), i, ch))
        if ch in "{[":
            self._stack.append([ch, self._key(), i])
            self._state = _FIRST_KEY_OR_CLOSE if ch == "{" else _FIRST_VALUE_OR_CLOSE
        elif ch == '"':
            self._state, self._start, self._key_start = _STRING, i, None
        elif ch == "-" or "0" <= ch <= "9":
            self._state, self._start = _NUMBER, i
            self._number = _MINUS if ch == "-" else _ZERO if ch == "0" else _INT
        elif ch in "tfn":
            self._state, self._start = _LITERAL, i
            self._literal = {"t": "rue", "f": "alse", "n": "ull"}[ch]
        else:
            return False
        return True

    def _number_step(self, ch: str) -> bool:
        """Whether ch continues the number (then it is read)."""
        s, digit = self._number, "0" <= ch <= "9"
        nxt = {
            _MINUS: _ZERO if ch == "0" else _INT if digit else None,
            _ZERO: _DOT if ch == "." else _E if ch in "eE" else None,
            _INT: _INT if digit else _DOT if ch == "." else _E if ch in "eE" else None,
            _DOT: _FRAC if digit else None,
            _FRAC: _FRAC if digit else _E if ch in "eE" else None,
            _E: _EXP if digit else _E_SIGN if ch in "+-" else None,
            _E_SIGN: _EXP if digit else None,
            _EXP: _EXP if digit else None,
        }[s]
        if nxt is None:
            return False
        self._number = nxt
        return True

    # -- where values end --

    def _key(self) -> str | None:
        """The member name of a value beginning now (None outside objects)."""
        return self._stack[-1][1] if self._stack and self._stack[-1][0] == "{" else None

    def _end_string(self, i: int) -> None:
        if self._key_start is not None:  # a member name: its value comes after the colon
            self._stack[-1][1] = json.loads(self.text[self._key_start : i + 1])
            self._key_start, self._state = None, _COLON
        else:
            self._end_scalar(i + 1)

    def _end_scalar(self, stop: int) -> None:
        self.events.append(("end", len(self._stack), self._key(), self._start, stop))
        self._after()

    def _close(self, i: int, kind: str) -> bool:
        _, _, start = self._stack.pop()
        self.events.append(("end", len(self._stack), self._key(), start, i + 1))
        self._after()
        return True

    def _after(self) -> None:
        self._state = _AFTER
        if not self._stack:
            self.done = True

    def _fail(self) -> None:
        self.error, self.events = True, []


class JsonCalls:
    """The tool calls in one JSON value as it is generated: a call object or a list of them, each
    {"name": ..., "arguments": {...}[, "id": ...]} (other members are ignored; arguments may also
    be a JSON string holding the object, and missing, {}).

    A call begins (CallBegins, its id and name) once its name is read and its arguments have
    begun; its arguments then stream as they come (ArgumentsText); it ends (CallEnds, the whole
    ToolCall) with its object. An id the model writes after the arguments (mistral-common's
    order) comes too late for the call's first chunk: such a call gets a new id, streamed or not.

    `error`: the text is not such a value (a call that began is then left unfinished); `done`: the
    value is whole. `begun`: the calls begun in this value; calls are numbered from first_index.

    State: the scanner, the depth of the call objects (0: one object, 1: a list), and the call
    being read."""

    def __init__(self, first_index: int):
        self.scanner = JsonScanner()
        self.next_index = first_index
        self.begun = 0
        self.error = False
        self._call_depth = 0  # depth of the call objects: 0, one object; 1, a list of them
        self._call: _Call | None = None

    @property
    def done(self) -> bool:
        return self.scanner.done

    def push_text(self, text: str) -> tuple[list[Piece], str]:
        """The pieces this text makes, and the text after the value's end or error (unread)."""
        out: list[Piece] = []
        if self.error or self.done:
            return out, text
        for k, ch in enumerate(text):
            self.scanner.push(ch)
            if self.scanner.error or not all(self._on_event(e, out) for e in self.scanner.events):
                self.error = True
                return _merged(out), text[k + 1:]
            if self._call is not None:
                out += self._begin_if_ready()
                out += self._call.streamed(self.scanner.text, len(self.scanner.text))
            if self.scanner.done:
                return _merged(out), text[k + 1:]
        return _merged(out), ""

    def _on_event(self, event: tuple, out: list[Piece]) -> bool:
        """Reads one scanner event; False: this is not a call."""
        what, depth, key = event[:3]
        if what == "begin":
            ch = event[4]
            if depth == 0:  # the whole value: a list of calls, or one
                self._call_depth = 1 if ch == "[" else 0
            if depth == self._call_depth:
                self._call = _Call()
                return ch == "{"
            if depth == self._call_depth + 1:
                return self._call.member_begins(key, event[3], ch)
            return True
        start, stop = event[3], event[4]
        if depth == self._call_depth + 1:
            return self._call.member_ends(key, self.scanner.text[start:stop])
        if depth == self._call_depth:  # the call object
            call = self._call
            if call.name is None:
                return False
            if call.args_start is None and call.args_text is None:
                call.args_text = "{}"
            out += self._begin_if_ready()
            out += call.streamed(self.scanner.text, stop)
            out.append(CallEnds(call.index, call.finished()))
            self._call = None
        return True

    def _begin_if_ready(self) -> list[Piece]:
        """The call's first piece, once its name is read and its arguments have begun."""
        call = self._call
        if call.index is not None or call.name is None or (call.args_start is None and call.args_text is None):
            return []
        call.index, self.next_index, self.begun = self.next_index, self.next_index + 1, self.begun + 1
        call.id = call_id_or_new(call.id)
        return [CallBegins(call.index, call.id, call.name)]


class _Call:
    """A call object being read: its name, id and arguments as far as they have come.

    Arguments written as an object stream from the scanner's text (args_start, args_stop: where
    they are in it); written as a JSON string, they are whole (args_text) once the string ends."""

    def __init__(self):
        self.name: str | None = None
        self.id: str | None = None
        self.index: int | None = None  # set when the call begins
        self.args_start: int | None = None
        self.args_stop: int | None = None
        self.args_text: str | None = None  # the arguments once whole
        self.sent = 0  # characters of the arguments streamed

    def member_begins(self, key: str | None, at: int, ch: str) -> bool:
        if key == "arguments":
            if self.args_start is not None or self.args_text is not None:
                return False
            if ch == "{":
                self.args_start = at
                return True
            return ch == '"'
        if key == "name":
            return ch == '"' and self.name is None
        return True

    def member_ends(self, key: str | None, text: str) -> bool:
        if key == "name":
            self.name = json.loads(text)
            return bool(self.name)
        if key == "id":
            if self.index is None:  # the id is fixed once the call's first chunk is out
                self.id = json.loads(text)
        elif key == "arguments":
            if self.args_start is not None:
                self.args_stop, self.args_text = self.args_start + len(text), text
            else:
                self.args_text = arguments_in_string(text)
                return self.args_text is not None
        return True

    def streamed(self, text: str, at: int) -> list[Piece]:
        """The arguments not yet sent, up to position `at` of the scanner's text, as a piece
        (none before the call begins, or if nothing is new)."""
        if self.index is None:
            return []
        if self.args_start is None:  # a string, or no arguments: whole at once
            new = (self.args_text or "")[self.sent:]
        else:
            new = text[self.args_start + self.sent : at if self.args_stop is None else min(at, self.args_stop)]
        self.sent += len(new)
        return [ArgumentsText(self.index, new)] if new else []

    def finished(self) -> ToolCall:
        return ToolCall(self.id, self.name, json.loads(self.args_text), self.args_text)


def arguments_in_string(text: str) -> str | None:
    """The arguments object held in a JSON string literal (some models write them so), as its
    JSON text; None where the string holds no JSON object."""
    try:
        inner = json.loads(text)
        if isinstance(inner, str) and isinstance(json.loads(inner), dict):
            return inner.strip()
    except ValueError:
        pass
    return None


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Consecutive argument fragments of one call as one."""
    out: list[Piece] = []
    for p in pieces:
        if isinstance(p, ArgumentsText) and out and isinstance(out[-1], ArgumentsText) and out[-1].index == p.index:
            out[-1] = ArgumentsText(p.index, out[-1].text + p.text)
        else:
            out.append(p)
    return out
