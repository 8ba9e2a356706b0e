// Greedy continuations with llama.cpp from given token ids (so both engines see the same prompt
// tokens), for bench/accuracy/run.sh. Reads, on stdin, lines "N id id id ..." (N tokens to
// generate); prints, per line, the generated ids. Built against the llama.cpp of
// bench/compare.py: see run.sh.
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "llama.h"

int main(int argc, char ** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s MODEL.gguf THREADS < prompts\n", argv[0]);
        return 2;
    }
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        std::fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 4096;
    cp.n_batch = 4096;
    cp.n_threads = cp.n_threads_batch = std::atoi(argv[2]);
    llama_context * ctx = llama_init_from_model(model, cp);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::string line;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        int n = 0;
        in >> n;
        std::vector<llama_token> ids;
        for (llama_token t; in >> t;) ids.push_back(t);
        llama_memory_clear(llama_get_memory(ctx), true);
        std::vector<llama_token> out;
        llama_batch batch = llama_batch_get_one(ids.data(), (int32_t) ids.size());
        llama_token next = 0;
        for (int i = 0; i < n; ++i) {
            if (llama_decode(ctx, batch) != 0) {
                std::fprintf(stderr, "llama_decode failed\n");
                return 1;
            }
            const float * logits = llama_get_logits_ith(ctx, -1);
            next = 0;
            for (int v = 1; v < n_vocab; ++v) {
                if (logits[v] > logits[next]) next = v;
            }
            out.push_back(next);
            batch = llama_batch_get_one(&out.back(), 1);
        }
        for (size_t i = 0; i < out.size(); ++i) std::printf(i ? " %d" : "%d", out[i]);
        std::printf("\n");
        std::fflush(stdout);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
