#!/usr/bin/env python3
"""Writes the engine sample files under tests/data/engines/ and their expected.json.

Each file is reconstructed from the engine's own serializer code (see README.md in this
directory for the source file and function behind every byte). Nothing here talks to a
server: the bytes are what the cited code writes for the request described in README.md.

Serializers emulated:
  compact      pydantic model_dump_json / serde_json / msgspec / nlohmann ordered_json dump /
               Starlette JSONResponse: separators (",", ":"), non-ASCII raw UTF-8,
               control characters as \\u00XX (lowercase hex).
  py_default   Python json.dumps() defaults (llama-cpp-python, vLLM/SGLang streaming errors):
               separators (", ", ": "), ensure_ascii=True (non-ASCII -> \\uXXXX, astral
               characters as surrogate pairs).
  go           Go encoding/json Marshal (Ollama): compact, non-ASCII raw, and the HTML
               characters <, >, & escaped as \\u003c, \\u003e, \\u0026.

expected.json is then computed by parsing the written files (not from the tables above), so
it checks the generator too. Run:  python3 tests/data/engines/generate.py
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
C = 1767225600  # created timestamp used everywhere (2026-01-01T00:00:00Z)

# The shared generated text: a quote, a newline, an ESC control character (always written as
# \u001b by every serializer), non-ASCII (é) and an astral character (😀), plus <, >, & that
# Go escapes.
D = ['He said', ' "h', 'éllo"', ' & <wave>', ' 😀', '\n', '\x1b[1mbold', '\x1b[0m done.']
TEXT = ''.join(D)
# Reasoning sample: two reasoning deltas, then the answer.
R = ['The user greets me.', ' Reply with "hi".']
A = ['Hi ', '👋']
# Tool call: get_weather(city="Zürich", unit="celsius").


def compact(o):
    return json.dumps(o, ensure_ascii=False, separators=(',', ':'))


def py_default(o):
    return json.dumps(o)


def go(o):
    s = compact(o)
    return s.replace('<', '\\u003c').replace('>', '\\u003e').replace('&', '\\u0026')


def sse(datas, done=True, sep='\n'):
    """Events as `data: <payload>` + blank line; '[DONE]' appended when done."""
    out = []
    for d in datas:
        if d.startswith(':'):  # a comment line, already formatted (e.g. ': ping - ...')
            out.append(d + sep + sep)
        else:
            out.append('data: ' + d + sep + sep)
    if done:
        out.append('data: [DONE]' + sep + sep)
    return ''.join(out)


FILES = {}


def put(path, text):
    FILES[path] = text


# ---------------------------------------------------------------------------------------------
# vLLM 0.33.0 (wheel vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl)
# ---------------------------------------------------------------------------------------------
V_ID = 'chatcmpl-8f3c1a2b4d5e6f708192a3b4c5d6e7f8'
V_MODEL = 'meta-llama/Llama-3.1-8B-Instruct'
V_FP = 'vllm-0.33.0-3f9c2a1b'


def v_first(model=V_MODEL, usage=None, idv=V_ID):
    ch = {'id': idv, 'object': 'chat.completion.chunk', 'created': C, 'model': model,
          'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''},
                       'logprobs': None, 'finish_reason': None}]}
    if usage is not None:
        ch['usage'] = usage
    ch['prompt_token_ids'] = None
    ch['prompt_text'] = None
    return compact(ch)


def v_mid(delta, model=V_MODEL, usage=None, idv=V_ID):
    ch = {'id': idv, 'object': 'chat.completion.chunk', 'created': C, 'model': model,
          'choices': [{'index': 0, 'delta': delta, 'logprobs': None, 'finish_reason': None,
                       'token_ids': None}]}
    if usage is not None:
        ch['usage'] = usage
    ch['kv_transfer_params'] = None
    return compact(ch)


def v_last(delta, finish, fingerprint, model=V_MODEL, usage=None, idv=V_ID):
    ch = {'id': idv, 'object': 'chat.completion.chunk', 'created': C, 'model': model,
          'choices': [{'index': 0, 'delta': delta, 'logprobs': None, 'finish_reason': finish,
                       'stop_reason': None, 'token_ids': None, 'weight_versions': None}]}
    if usage is not None:
        ch['usage'] = usage
    if fingerprint:
        ch['system_fingerprint'] = V_FP
    ch['kv_transfer_params'] = None
    return compact(ch)


def v_usage_chunk(usage, model=V_MODEL, idv=V_ID):
    return compact({'id': idv, 'object': 'chat.completion.chunk', 'created': C, 'model': model,
                    'choices': [], 'usage': usage, 'system_fingerprint': V_FP})


def v_cont_usage(p, c):
    return {'prompt_tokens': p, 'total_tokens': p + c, 'completion_tokens': c,
            'completion_tokens_details': None}


put('vllm/chat_stream.sse', sse(
    [v_first()] + [v_mid({'content': d}) for d in D] + [v_last({'content': ''}, 'stop', True)]))

put('vllm/chat_stream_include_usage.sse', sse(
    [v_first()] + [v_mid({'content': d}) for d in D] + [v_last({'content': ''}, 'stop', False)]
    + [v_usage_chunk({'prompt_tokens': 96, 'total_tokens': 105, 'completion_tokens': 9,
                      'prompt_tokens_details': {'cached_tokens': 64, 'created_cache_tokens': 32}})]))

put('vllm/chat_stream_continuous_usage.sse', sse(
    [v_first(usage=v_cont_usage(96, 0))]
    + [v_mid({'content': d}, usage=v_cont_usage(96, i + 1)) for i, d in enumerate(D)]
    + [v_last({'content': ''}, 'stop', False, usage=v_cont_usage(96, 9))]
    + [v_usage_chunk({'prompt_tokens': 96, 'total_tokens': 105, 'completion_tokens': 9})]))

QWEN = 'Qwen/Qwen3-8B'
put('vllm/chat_stream_reasoning.sse', sse(
    [v_first(model=QWEN)]
    + [v_mid({'reasoning': r}, model=QWEN) for r in R]
    + [v_mid({'content': '\n\n'}, model=QWEN)]
    + [v_mid({'content': a}, model=QWEN) for a in A]
    + [v_last({'content': ''}, 'stop', False, model=QWEN)]
    + [v_usage_chunk({'prompt_tokens': 40, 'total_tokens': 48, 'completion_tokens': 8,
                      'completion_tokens_details': {'reasoning_tokens': 2}}, model=QWEN)]))

# vLLM 0.11.0 (before PR #27752): reasoning_content, no reasoning_tokens, no fingerprint,
# no kv_transfer_params / prompt_text on chunks.
V11_ID = 'chatcmpl-1b2c3d4e5f60718293a4b5c6d7e8f901'


def v11(delta, finish=None, last=False):
    choice = {'index': 0, 'delta': delta, 'logprobs': None, 'finish_reason': finish}
    if last:
        choice['stop_reason'] = None
    choice['token_ids'] = None
    return compact({'id': V11_ID, 'object': 'chat.completion.chunk', 'created': C,
                    'model': QWEN, 'choices': [choice]})


put('vllm/chat_stream_reasoning_content_v0.11.sse', sse(
    [compact({'id': V11_ID, 'object': 'chat.completion.chunk', 'created': C, 'model': QWEN,
              'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''},
                           'logprobs': None, 'finish_reason': None}],
              'prompt_token_ids': None})]
    + [v11({'reasoning_content': r}) for r in R]
    + [v11({'content': '\n\n'})] + [v11({'content': a}) for a in A]
    + [v11({'content': ''}, 'stop', last=True)]
    + [compact({'id': V11_ID, 'object': 'chat.completion.chunk', 'created': C, 'model': QWEN,
                'choices': [], 'usage': {'prompt_tokens': 40, 'total_tokens': 48,
                                         'completion_tokens': 8}})]))

V_TOOL_ID = 'chatcmpl-tool-0a1b2c3d4e5f60718293a4b5c6d7e8f9'
ARGS_SPACED = ['{"city": "', 'Zürich', '", "unit": "', 'celsius"}']
put('vllm/chat_stream_tool_call.sse', sse(
    [v_first()]
    + [v_mid({'tool_calls': [{'id': V_TOOL_ID, 'type': 'function', 'index': 0,
                              'function': {'name': 'get_weather', 'arguments': ARGS_SPACED[0]}}]})]
    + [v_mid({'tool_calls': [{'index': 0, 'function': {'arguments': a}}]}) for a in ARGS_SPACED[1:]]
    + [v_last({'tool_calls': [{'index': 0, 'function': {'arguments': ''}}]}, 'stop', False)]
    + [v_usage_chunk({'prompt_tokens': 180, 'total_tokens': 185, 'completion_tokens': 5})]))

put('vllm/chat.json', compact({
    'id': V_ID, 'object': 'chat.completion', 'created': C, 'model': V_MODEL,
    'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': TEXT, 'refusal': None,
                                         'annotations': None, 'audio': None,
                                         'function_call': None, 'reasoning': None},
                 'logprobs': None, 'finish_reason': 'stop', 'stop_reason': None,
                 'token_ids': None, 'routed_experts': None, 'weight_versions': None}],
    'service_tier': None, 'system_fingerprint': V_FP,
    'usage': {'prompt_tokens': 96, 'total_tokens': 105, 'completion_tokens': 9,
              'prompt_tokens_details': {'cached_tokens': 64, 'created_cache_tokens': 32,
                                        'multimodal_tokens': None},
              'completion_tokens_details': None},
    'prompt_logprobs': None, 'prompt_token_ids': None, 'prompt_text': None,
    'kv_transfer_params': None, 'ec_transfer_params': None, 'metrics': None}))

V_CMPL = 'cmpl-2c3d4e5f60718293a4b5c6d7e8f90a1b'


def v_cmpl(text, finish=None):
    return compact({'id': V_CMPL, 'object': 'text_completion', 'created': C, 'model': V_MODEL,
                    'choices': [{'index': 0, 'text': text, 'logprobs': None,
                                 'finish_reason': finish, 'stop_reason': None,
                                 'prompt_token_ids': None, 'token_ids': None,
                                 'weight_versions': None}],
                    'kv_transfer_params': None})


put('vllm/completion_stream_include_usage.sse', sse(
    [v_cmpl(d) for d in D[:-1]] + [v_cmpl(D[-1], 'length')]
    + [compact({'id': V_CMPL, 'object': 'text_completion', 'created': C, 'model': V_MODEL,
                'choices': [], 'usage': {'prompt_tokens': 5, 'total_tokens': 13,
                                         'completion_tokens': 8},
                'system_fingerprint': V_FP})]))

put('vllm/chat_stream_error.sse', sse(
    [v_first()] + [v_mid({'content': d}) for d in D[:2]]
    + [compact({'error': {'message': 'Internal server error', 'type': 'InternalServerError',
                          'param': None, 'code': 500}})]))

# ---------------------------------------------------------------------------------------------
# llama.cpp server, ggml-org/llama.cpp@0c1e57098 (the copy vendored by llama-cpp-python 0.3.36),
# built without git metadata: system_fingerprint "b1-0c1e570".
# ---------------------------------------------------------------------------------------------
L_ID = 'chatcmpl-Zq3xK9mP2wR7tY5uV1nB8cD4eF6gH0jL'
L_MODEL = 'Llama-3.2-1B-Instruct-Q4_K_M.gguf'
L_FP = 'b1-0c1e570'
L_TIMINGS = {'cache_n': 64, 'prompt_n': 32, 'prompt_ms': 45.123, 'prompt_per_token_ms': 1.41,
             'prompt_per_second': 709.17, 'predicted_n': 9, 'predicted_ms': 120.5,
             'predicted_per_token_ms': 13.39, 'predicted_per_second': 74.69}
L_USAGE = {'completion_tokens': 9, 'prompt_tokens': 96, 'total_tokens': 105,
           'prompt_tokens_details': {'cached_tokens': 64}}


def l_chunk(delta, finish=None, model=L_MODEL):
    return {'choices': [{'finish_reason': finish, 'index': 0, 'delta': delta}],
            'created': C, 'id': L_ID, 'model': model, 'system_fingerprint': L_FP,
            'object': 'chat.completion.chunk'}


def l_usage_chunk(usage, timings, model=L_MODEL):
    return {'choices': [], 'created': C, 'id': L_ID, 'model': model,
            'system_fingerprint': L_FP, 'object': 'chat.completion.chunk', 'usage': usage,
            'timings': timings}


def l_stream(deltas, finish, include_usage, usage, timings, model=L_MODEL):
    ev = [compact(l_chunk({'role': 'assistant', 'content': None}, model=model))]
    ev += [compact(l_chunk(d, model=model)) for d in deltas]
    fin = l_chunk({}, finish, model=model)
    if include_usage:
        ev.append(compact(fin))
        ev.append(compact(l_usage_chunk(usage, timings, model=model)))
    else:
        fin['timings'] = timings
        ev.append(compact(fin))
    return sse(ev)


put('llamacpp/chat_stream.sse', l_stream([{'content': d} for d in D], 'stop', False, None, L_TIMINGS))
put('llamacpp/chat_stream_include_usage.sse',
    l_stream([{'content': d} for d in D], 'stop', True, L_USAGE, L_TIMINGS))
LQ_MODEL = 'Qwen3-8B-Q4_K_M.gguf'
LQ_TIMINGS = dict(L_TIMINGS, cache_n=0, prompt_n=40, predicted_n=6)
put('llamacpp/chat_stream_reasoning.sse', l_stream(
    [{'reasoning_content': r} for r in R] + [{'content': a} for a in A], 'stop', True,
    {'completion_tokens': 6, 'prompt_tokens': 40, 'total_tokens': 46,
     'prompt_tokens_details': {'cached_tokens': 0}}, LQ_TIMINGS, model=LQ_MODEL))
L_TOOL_ID = 'pR8sT2uV4wX6yZ0aB1cD3eF5gH7iJ9kL'
ARGS_COMPACT = ['{"city":"', 'Zürich', '","unit":"', 'celsius', '"}']
put('llamacpp/chat_stream_tool_call.sse', l_stream(
    [{'tool_calls': [{'index': 0, 'id': L_TOOL_ID, 'type': 'function',
                      'function': {'name': 'get_weather', 'arguments': ARGS_COMPACT[0]}}]}]
    + [{'tool_calls': [{'index': 0, 'function': {'arguments': a}}]} for a in ARGS_COMPACT[1:]],
    'tool_calls', True,
    {'completion_tokens': 14, 'prompt_tokens': 210, 'total_tokens': 224,
     'prompt_tokens_details': {'cached_tokens': 0}},
    dict(L_TIMINGS, cache_n=0, prompt_n=210, predicted_n=14)))
put('llamacpp/chat.json', compact({
    'choices': [{'finish_reason': 'stop', 'index': 0,
                 'message': {'role': 'assistant', 'content': TEXT}}],
    'created': C, 'model': L_MODEL, 'system_fingerprint': L_FP, 'object': 'chat.completion',
    'usage': L_USAGE, 'id': L_ID, 'timings': L_TIMINGS}))


def l_cmpl(text, finish=None):
    return {'choices': [{'text': text, 'index': 0, 'logprobs': None, 'finish_reason': finish}],
            'created': C, 'model': L_MODEL, 'system_fingerprint': L_FP,
            'object': 'text_completion', 'id': L_ID}


fin = {'choices': [{'text': '', 'index': 0, 'logprobs': None, 'finish_reason': 'length'}],
       'created': C, 'model': L_MODEL, 'system_fingerprint': L_FP, 'object': 'text_completion',
       'usage': {'completion_tokens': 8, 'prompt_tokens': 5, 'total_tokens': 13,
                 'prompt_tokens_details': {'cached_tokens': 0}},
       'id': L_ID, 'timings': dict(L_TIMINGS, cache_n=0, prompt_n=5, predicted_n=8)}
put('llamacpp/completion_stream.sse', sse([compact(l_cmpl(d)) for d in D] + [compact(fin)]))
put('llamacpp/chat_stream_error.sse', sse(
    [compact(l_chunk({'role': 'assistant', 'content': None}))]
    + [compact(l_chunk({'content': d})) for d in D[:2]]
    + [compact({'error': {'code': 500, 'message': 'Invalid diff: now finding less tool calls!',
                          'type': 'server_error'}})], done=False))

# ---------------------------------------------------------------------------------------------
# llama-cpp-python 0.3.36 (abetlen/llama-cpp-python; python files identical to v0.3.35 @3691546)
# sse-starlette EventSourceResponse(sep="\n"), data = json.dumps(chunk)
# ---------------------------------------------------------------------------------------------
P_CMPL = 'cmpl-5c1f7e0a-9b2d-4e3f-8a6b-1c2d3e4f5a6b'
P_ID = 'chat' + P_CMPL
P_MODEL = 'llama-3.2-1b-instruct'
PING = ': ping - 2026-01-01 00:00:15.000042+00:00'


def p_chat(delta, finish=None):
    return py_default({'id': P_ID, 'model': P_MODEL, 'created': C,
                       'object': 'chat.completion.chunk',
                       'choices': [{'index': 0, 'delta': delta, 'logprobs': None,
                                    'finish_reason': finish}]})


put('llama-cpp-python/chat_stream.sse', sse(
    [p_chat({'role': 'assistant'})] + [p_chat({'content': d}) for d in D[:4]] + [PING]
    + [p_chat({'content': d}) for d in D[4:]] + [p_chat({}, 'stop')]))

P_TOOL = 'call__0_get_weather_' + P_CMPL


def p_tool(args):
    return py_default({'id': P_ID, 'object': 'chat.completion.chunk', 'created': C,
                       'model': P_MODEL,
                       'choices': [{'index': 0, 'finish_reason': None, 'logprobs': None,
                                    'delta': {'role': None, 'content': None,
                                              'function_call': {'name': 'get_weather',
                                                                'arguments': args},
                                              'tool_calls': [{'index': 0, 'id': P_TOOL,
                                                              'type': 'function',
                                                              'function': {
                                                                  'name': 'get_weather',
                                                                  'arguments': args}}]}}]})


def p_tool_edge(finish):
    return py_default({'id': P_ID, 'object': 'chat.completion.chunk', 'created': C,
                       'model': P_MODEL,
                       'choices': [{'index': 0, 'finish_reason': finish, 'logprobs': None,
                                    'delta': {'role': 'assistant' if finish is None else None,
                                              'content': None, 'function_call': None,
                                              'tool_calls': None}}]})


put('llama-cpp-python/chat_stream_tool_call.sse', sse(
    [p_tool_edge(None)] + [p_tool(a) for a in ARGS_SPACED] + [p_tool('')]
    + [p_tool_edge('tool_calls')]))
put('llama-cpp-python/chat.json', compact({
    'id': P_ID, 'object': 'chat.completion', 'created': C, 'model': P_MODEL,
    'choices': [{'index': 0, 'message': {'content': TEXT, 'role': 'assistant'},
                 'logprobs': None, 'finish_reason': 'stop'}],
    'usage': {'prompt_tokens': 96, 'completion_tokens': 9, 'total_tokens': 105}}))


def p_cmpl(text, finish=None):
    return py_default({'id': P_CMPL, 'object': 'text_completion', 'created': C,
                       'model': P_MODEL,
                       'choices': [{'text': text, 'index': 0, 'logprobs': None,
                                    'finish_reason': finish}]})


put('llama-cpp-python/completion_stream.sse', sse([p_cmpl(d) for d in D] + [p_cmpl('', 'length')]))

# ---------------------------------------------------------------------------------------------
# TGI (huggingface/text-generation-inference @db931fcf, router 3.3.6-dev0, axum 0.7.9 SSE)
# ---------------------------------------------------------------------------------------------
T_MODEL = 'meta-llama/Llama-3.1-8B-Instruct'
T_FP = '3.3.6-dev0-native'


def t_chat(delta, finish=None, usage=None, choices=True):
    return compact({'object': 'chat.completion.chunk', 'id': '', 'created': C, 'model': T_MODEL,
                    'system_fingerprint': T_FP,
                    'choices': [{'index': 0, 'delta': delta, 'logprobs': None,
                                 'finish_reason': finish}] if choices else [],
                    'usage': usage})


T_USAGE = {'prompt_tokens': 96, 'completion_tokens': 9, 'total_tokens': 105}
t_events = [t_chat({'role': 'assistant', 'content': d}) for d in D] + [
    t_chat({'role': 'assistant', 'content': ''}, 'stop')]
put('tgi/chat_stream.sse', sse(t_events))
put('tgi/chat_stream_include_usage.sse', sse(t_events + [t_chat(None, usage=T_USAGE, choices=False)]))
T_ARGS = ['{', ' "', 'city', '":', ' "', 'Z', 'ürich', '",', ' "', 'unit', '":', ' "', 'celsius', '"}']
put('tgi/chat_stream_tool_call.sse', sse(
    [t_chat({'role': 'assistant', 'tool_calls': [{'index': 0, 'id': '0', 'type': 'function',
                                                  'function': {'name': 'get_weather',
                                                               'arguments': T_ARGS[0]}}]})]
    + [t_chat({'role': 'assistant', 'tool_calls': [{'index': 0, 'id': '0', 'type': 'function',
                                                    'function': {'name': None,
                                                                 'arguments': a}}]})
       for a in T_ARGS[1:]]
    + [t_chat(None, usage={'prompt_tokens': 250, 'completion_tokens': 24, 'total_tokens': 274},
              choices=False)]))
put('tgi/chat.json', compact({
    'object': 'chat.completion', 'id': '', 'created': C, 'model': T_MODEL,
    'system_fingerprint': T_FP,
    'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': TEXT},
                 'logprobs': None, 'finish_reason': 'stop'}],
    'usage': T_USAGE}))
put('tgi/completion_stream.sse', sse(
    [compact({'object': 'text_completion', 'id': '', 'created': C,
              'choices': [{'index': 0, 'text': d, 'logprobs': None, 'finish_reason': ''}],
              'model': T_MODEL, 'system_fingerprint': T_FP}) for d in D[:-1]]
    + [compact({'object': 'text_completion', 'id': '', 'created': C, 'model': T_MODEL,
                'system_fingerprint': T_FP,
                'choices': [{'index': 0, 'text': D[-1], 'logprobs': None,
                             'finish_reason': 'length'}],
                'usage': {'prompt_tokens': 5, 'completion_tokens': 8, 'total_tokens': 13}})]))
put('tgi/chat_stream_error.sse', sse(
    [t_chat({'role': 'assistant', 'content': d}) for d in D[:2]]
    + [compact({'error': {'message': 'Request failed during generation: Server error: CUDA out of memory',
                          'http_status_code': 422}})]))

# ---------------------------------------------------------------------------------------------
# Ollama (ollama/ollama @fb30760, v0.33.0-rc2): middleware/openai.go + openai/openai.go
# ---------------------------------------------------------------------------------------------
O_ID = 'chatcmpl-417'
O_MODEL = 'llama3.2'


def o_chat(delta, finish=None, choices=True, usage=None):
    ch = {'id': O_ID, 'object': 'chat.completion.chunk', 'created': C, 'model': O_MODEL,
          'system_fingerprint': 'fp_ollama',
          'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}] if choices else []}
    if usage is not None:
        ch['usage'] = usage
    return go(ch)


o_events = [o_chat({'role': 'assistant', 'content': D[0]})] + [o_chat({'content': d}) for d in D[1:]] \
    + [o_chat({}, 'stop')]
put('ollama/chat_stream.sse', sse(o_events))
put('ollama/chat_stream_include_usage.sse', sse(o_events + [o_chat(None, choices=False, usage=T_USAGE)]))
put('ollama/chat_stream_reasoning.sse', sse(
    [o_chat({'role': 'assistant', 'content': '', 'reasoning': R[0]}),
     o_chat({'content': '', 'reasoning': R[1]})]
    + [o_chat({'content': a}) for a in A] + [o_chat({}, 'stop')]
    + [o_chat(None, choices=False, usage={'prompt_tokens': 40, 'completion_tokens': 8,
                                          'total_tokens': 48})]))
put('ollama/chat_stream_tool_call.sse', sse(
    [o_chat({'role': 'assistant', 'content': '',
             'tool_calls': [{'id': 'call_k3j9x2ab', 'index': 0, 'type': 'function',
                             'function': {'name': 'get_weather',
                                          'arguments': '{"city":"Zürich","unit":"celsius"}'}}]}),
     o_chat({}, 'tool_calls'),
     o_chat(None, choices=False, usage={'prompt_tokens': 210, 'completion_tokens': 24,
                                        'total_tokens': 234})]))
put('ollama/chat.json', go({
    'id': O_ID, 'object': 'chat.completion', 'created': C, 'model': O_MODEL,
    'system_fingerprint': 'fp_ollama',
    'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': TEXT},
                 'finish_reason': 'stop'}],
    'usage': T_USAGE}) + '\n')
O_CMPL = 'cmpl-58'


def o_cmpl(text, finish=None, choices=True, usage=None):
    return go({'id': O_CMPL, 'object': 'text_completion', 'created': C,
               'choices': [{'text': text, 'index': 0, 'finish_reason': finish}] if choices else [],
               'model': O_MODEL, 'system_fingerprint': 'fp_ollama',
               'usage': usage if usage is not None else
               {'prompt_tokens': 0, 'completion_tokens': 0, 'total_tokens': 0}})


put('ollama/completion_stream_include_usage.sse', sse(
    [o_cmpl(d) for d in D] + [o_cmpl('', 'length')]
    + [o_cmpl(None, choices=False, usage={'prompt_tokens': 5, 'completion_tokens': 8,
                                          'total_tokens': 13})]))

# ---------------------------------------------------------------------------------------------
# SGLang 0.5.23 (wheel sglang-0.5.23-cp311): msgspec chunks (sse_utils.build_sse_content) and
# pydantic chunks (ChatCompletionStreamResponse.model_dump_json()).
# ---------------------------------------------------------------------------------------------
S_ID = 'a3f1c2e4b5d6978812ab34cd56ef7890'
S_MODEL = 'meta-llama/Llama-3.1-8B-Instruct'


def s_msgspec(role=None, content=None, reasoning=None, finish=None, matched=None, usage=None,
              model=S_MODEL):
    delta = {'reasoning_content': reasoning}
    if role is not None:
        delta['role'] = role
    if content is not None:
        delta['content'] = content
    ch = {'id': S_ID, 'object': 'chat.completion.chunk', 'created': C, 'model': model,
          'choices': [{'index': 0, 'delta': delta, 'logprobs': None, 'finish_reason': finish,
                       'matched_stop': matched}]}
    if usage is not None:
        ch['usage'] = usage
    return compact(ch)


def s_usage(p, c, cached=None, reasoning=0):
    return {'prompt_tokens': p, 'total_tokens': p + c, 'completion_tokens': c,
            'prompt_tokens_details': None if cached is None else {'cached_tokens': cached},
            'reasoning_tokens': reasoning,
            'completion_tokens_details': {'reasoning_tokens': reasoning} if reasoning else None}


def s_usage_chunk(usage, model=S_MODEL):
    return compact({'id': S_ID, 'object': 'chat.completion.chunk', 'created': C, 'model': model,
                    'choices': [], 'usage': usage})


s_plain = [s_msgspec(role='assistant', content='')] + [s_msgspec(content=d) for d in D] \
    + [s_msgspec(finish='stop', matched=128009)]
put('sglang/chat_stream.sse', sse(s_plain))
put('sglang/chat_stream_include_usage.sse', sse(s_plain + [s_usage_chunk(s_usage(96, 9, cached=64))]))
put('sglang/chat_stream_continuous_usage.sse', sse(
    [s_msgspec(role='assistant', content='')]
    + [s_msgspec(content=d, usage=s_usage(96, i + 1)) for i, d in enumerate(D)]
    + [s_msgspec(finish='stop', matched=128009)] + [s_usage_chunk(s_usage(96, 9))]))
put('sglang/chat_stream_reasoning.sse', sse(
    [s_msgspec(role='assistant', content='', model=QWEN)]
    + [s_msgspec(reasoning=r, model=QWEN) for r in R]
    + [s_msgspec(content=a, model=QWEN) for a in A]
    + [s_msgspec(finish='stop', matched=151645, model=QWEN)]
    + [s_usage_chunk(s_usage(40, 8, reasoning=2), model=QWEN)]))
S_TOOL_MODEL = 'Qwen/Qwen2.5-7B-Instruct'


def s_tool(tc):
    return compact({'id': S_ID, 'object': 'chat.completion.chunk', 'created': C,
                    'model': S_TOOL_MODEL,
                    'choices': [{'index': 0, 'delta': {'role': None, 'content': None,
                                                       'reasoning_content': None,
                                                       'tool_calls': [tc]},
                                 'logprobs': None, 'finish_reason': None, 'matched_stop': None}],
                    'usage': None})


put('sglang/chat_stream_tool_call.sse', sse(
    [s_msgspec(role='assistant', content='', model=S_TOOL_MODEL)]
    + [s_tool({'id': 'call_9f8e7d6c5b4a39281706f5e4', 'index': 0, 'type': 'function',
               'function': {'name': 'get_weather', 'arguments': ''}})]
    + [s_tool({'id': None, 'index': 0, 'type': 'function',
               'function': {'name': None, 'arguments': a}}) for a in ARGS_SPACED]
    + [s_msgspec(finish='tool_calls', matched=None, model=S_TOOL_MODEL)]
    + [s_usage_chunk(s_usage(220, 18), model=S_TOOL_MODEL)]))
put('sglang/chat.json', compact({
    'id': S_ID, 'object': 'chat.completion', 'created': C, 'model': S_MODEL,
    'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': TEXT,
                                         'reasoning_content': None},
                 'logprobs': None, 'finish_reason': 'stop', 'matched_stop': 128009}],
    'usage': s_usage(96, 9, cached=64), 'metadata': None}))


def s_cmpl(text, finish=None):
    return compact({'id': S_ID, 'object': 'text_completion', 'created': C, 'model': S_MODEL,
                    'choices': [{'index': 0, 'text': text, 'logprobs': None,
                                 'finish_reason': finish, 'matched_stop': None}],
                    'usage': None})


put('sglang/completion_stream_include_usage.sse', sse(
    [s_cmpl(d) for d in D[:-1]] + [s_cmpl(D[-1], 'length')]
    + [compact({'id': S_ID, 'object': 'text_completion', 'created': C, 'model': S_MODEL,
                'choices': [], 'usage': {'prompt_tokens': 5, 'total_tokens': 13,
                                         'completion_tokens': 8, 'reasoning_tokens': 0}})]))

# ---------------------------------------------------------------------------------------------
# OpenAI (openai/openai-openapi @f85dbe2, openapi.yaml)
# ---------------------------------------------------------------------------------------------
# The API reference's own streaming example, events as printed (note the stray spaces after
# "model" and "system_fingerprint"), framed as `data: ` events.
put('openai/chat_stream_docs_example.sse', sse([
    '{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb", "choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}',
    '{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb", "choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]}',
    '{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb", "choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}',
]))
OA_ID = 'chatcmpl-BvQ3kZ8mN2pL7xR4tY6uW1sE9aD5f'
OA_MODEL = 'gpt-4o-mini-2024-07-18'
OBF = ['r4N7vQ2m', 'p9K3xT6w', 'Zx1', 'b7', 'Qm4s', 'u', 'T0pL', 'k', '', 'aB3d']


def oa(delta, i, finish=None, model=OA_MODEL, choices=True, usage=None, idv=OA_ID):
    return compact({'id': idv, 'object': 'chat.completion.chunk', 'created': C, 'model': model,
                    'service_tier': 'default', 'system_fingerprint': 'fp_560af6e559',
                    'choices': [{'index': 0, 'delta': delta, 'logprobs': None,
                                 'finish_reason': finish}] if choices else [],
                    'usage': usage, 'obfuscation': OBF[i % len(OBF)]})


OA_USAGE = {'prompt_tokens': 96, 'completion_tokens': 9, 'total_tokens': 105,
            'prompt_tokens_details': {'cached_tokens': 64, 'audio_tokens': 0},
            'completion_tokens_details': {'reasoning_tokens': 0, 'audio_tokens': 0,
                                          'accepted_prediction_tokens': 0,
                                          'rejected_prediction_tokens': 0}}
put('openai/chat_stream_include_usage.sse', sse(
    [oa({'role': 'assistant', 'content': '', 'refusal': None}, 0)]
    + [oa({'content': d}, i + 1) for i, d in enumerate(D)]
    + [oa({}, 9, 'stop'), oa(None, 8, choices=False, usage=OA_USAGE)]))
put('openai/chat_stream_reasoning_hidden.sse', sse(
    [oa({'role': 'assistant', 'content': '', 'refusal': None}, 0, model='gpt-5-mini-2025-08-07')]
    + [oa({'content': a}, i + 1, model='gpt-5-mini-2025-08-07') for i, a in enumerate(A)]
    + [oa({}, 3, 'stop', model='gpt-5-mini-2025-08-07'),
       oa(None, 4, model='gpt-5-mini-2025-08-07', choices=False,
          usage={'prompt_tokens': 40, 'completion_tokens': 196, 'total_tokens': 236,
                 'prompt_tokens_details': {'cached_tokens': 0, 'audio_tokens': 0},
                 'completion_tokens_details': {'reasoning_tokens': 192, 'audio_tokens': 0,
                                               'accepted_prediction_tokens': 0,
                                               'rejected_prediction_tokens': 0}})]))
put('openai/chat_stream_tool_call.sse', sse(
    [oa({'role': 'assistant', 'content': None,
         'tool_calls': [{'index': 0, 'id': 'call_Vx3bQ9mK2pL7nR4tY6uW1sE9',
                         'type': 'function',
                         'function': {'name': 'get_weather', 'arguments': ''}}],
         'refusal': None}, 0)]
    + [oa({'tool_calls': [{'index': 0, 'function': {'arguments': a}}]}, i + 1)
       for i, a in enumerate(['{"', 'city', '":"', 'Z', 'ürich', '","', 'unit', '":"', 'celsius', '"}'])]
    + [oa({}, 3, 'tool_calls'),
       oa(None, 4, choices=False,
          usage=dict(OA_USAGE, prompt_tokens=120, completion_tokens=18, total_tokens=138,
                     prompt_tokens_details={'cached_tokens': 0, 'audio_tokens': 0}))]))
put('openai/chat.json', json.dumps({
    'id': OA_ID, 'object': 'chat.completion', 'created': C, 'model': OA_MODEL,
    'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': TEXT, 'refusal': None,
                                         'annotations': []},
                 'logprobs': None, 'finish_reason': 'stop'}],
    'usage': OA_USAGE, 'service_tier': 'default'}, ensure_ascii=False, indent=2) + '\n')

# ---------------------------------------------------------------------------------------------
# Mistral (hosted API; schema from mistralai/client-python @05629d2 v2.5.1) -- not source-derived
# ---------------------------------------------------------------------------------------------
M_ID = '0e8c5b3a7f2d4c1e9b6a8d7f5e3c2b1a'
M_MODEL = 'mistral-small-latest'


def m(delta, finish=None, usage=None, model=M_MODEL):
    ch = {'id': M_ID, 'object': 'chat.completion.chunk', 'created': C, 'model': model,
          'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]}
    if usage is not None:
        ch['usage'] = usage
    return compact(ch)


M_USAGE = {'prompt_tokens': 96, 'total_tokens': 105, 'completion_tokens': 9}
put('mistral/chat_stream.sse', sse(
    [m({'role': 'assistant', 'content': ''})] + [m({'content': d}) for d in D]
    + [m({'content': ''}, 'stop', M_USAGE)]))
MAG = 'magistral-small-latest'
put('mistral/chat_stream_reasoning.sse', sse(
    [m({'role': 'assistant', 'content': ''}, model=MAG)]
    + [m({'content': [{'type': 'thinking', 'thinking': [{'type': 'text', 'text': r}]}]}, model=MAG)
       for r in R]
    + [m({'content': a}, model=MAG) for a in A]
    + [m({'content': ''}, 'stop', {'prompt_tokens': 40, 'total_tokens': 48,
                                  'completion_tokens': 8}, model=MAG)]))
put('mistral/chat_stream_tool_call.sse', sse(
    [m({'role': 'assistant', 'content': ''}),
     m({'tool_calls': [{'id': 'D681PevKs', 'function': {'name': 'get_weather',
                                                       'arguments': '{"city": "Zürich", "unit": "celsius"}'},
                        'index': 0}]}, 'tool_calls',
       {'prompt_tokens': 120, 'total_tokens': 138, 'completion_tokens': 18})]))
put('mistral/chat.json', compact({
    'id': M_ID, 'object': 'chat.completion', 'created': C, 'model': M_MODEL,
    'choices': [{'index': 0, 'message': {'role': 'assistant', 'tool_calls': None,
                                         'content': TEXT},
                 'finish_reason': 'stop'}],
    'usage': M_USAGE}))


# ---------------------------------------------------------------------------------------------
# expected.json: computed by parsing what was written.
# ---------------------------------------------------------------------------------------------
def texts_of_choice(choice):
    """Generated text strings of one choice, in JSON order."""
    out = []
    body = choice.get('delta')
    if body is None:
        body = choice.get('message')
    if isinstance(choice.get('text'), str):
        out.append(choice['text'])
    if not isinstance(body, dict):
        return out
    for key, val in body.items():
        if key in ('content', 'reasoning_content', 'reasoning'):
            if isinstance(val, str):
                out.append(val)
            elif isinstance(val, list):  # Mistral content chunks
                for part in val:
                    if part.get('type') == 'text':
                        out.append(part.get('text', ''))
                    elif part.get('type') == 'thinking':
                        for t in part.get('thinking', []):
                            if t.get('type') == 'text':
                                out.append(t.get('text', ''))
        elif key == 'tool_calls' and isinstance(val, list):
            for tc in val:
                fn = tc.get('function') or {}
                if isinstance(fn.get('arguments'), str):
                    out.append(fn['arguments'])
        # 'function_call' (deprecated) is deliberately ignored: llama-cpp-python repeats the
        # tool arguments there, and counting both would double the text.
    return out


def norm_usage(u):
    if not isinstance(u, dict):
        return None
    ptd = u.get('prompt_tokens_details')
    ctd = u.get('completion_tokens_details')
    cached = ptd.get('cached_tokens') if isinstance(ptd, dict) else None
    reasoning = ctd.get('reasoning_tokens') if isinstance(ctd, dict) else None
    if reasoning is None and isinstance(u.get('reasoning_tokens'), int):
        reasoning = u['reasoning_tokens']
    return {'prompt_tokens': u.get('prompt_tokens'), 'completion_tokens': u.get('completion_tokens'),
            'cached_tokens': cached, 'reasoning_tokens': reasoning}


def analyse(path, raw):
    text = raw.decode('utf-8')
    if path.endswith('.json'):
        doc = json.loads(text)
        parts = [t for ch in doc.get('choices', []) for t in texts_of_choice(ch)]
        return {'usage': norm_usage(doc.get('usage')), 'text': ''.join(parts),
                'content_events': 0, 'done': False}
    usage, parts, events, done = None, [], 0, False
    for block in text.replace('\r\n', '\n').split('\n\n'):
        data = [ln[5:].lstrip(' ') if ln.startswith('data:') else None
                for ln in block.split('\n') if ln and not ln.startswith(':')]
        data = [d for d in data if d is not None]
        if not data:
            continue
        payload = '\n'.join(data)
        if payload == '[DONE]':
            done = True
            continue
        obj = json.loads(payload)
        u = norm_usage(obj.get('usage'))
        if u is not None:
            usage = u
        got = [t for ch in obj.get('choices', []) or [] for t in texts_of_choice(ch)]
        if any(got):
            events += 1
        parts.extend(got)
    return {'usage': usage, 'text': ''.join(parts), 'content_events': events, 'done': done}


def main():
    expected = {}
    for path in sorted(FILES):
        full = os.path.join(HERE, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        raw = FILES[path].encode('utf-8')
        with open(full, 'wb') as f:
            f.write(raw)
        expected[path] = analyse(path, raw)
    with open(os.path.join(HERE, 'expected.json'), 'w', encoding='utf-8') as f:
        json.dump(expected, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write('\n')
    for path, e in expected.items():
        print(f"{path}: events={e['content_events']} done={e['done']} usage={e['usage']}")


if __name__ == '__main__':
    sys.exit(main())
