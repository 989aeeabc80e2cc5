// The few functions of onnxruntime-extensions' tokenizer C API that echoembed-cpp uses.
//
// The onnxruntime-extensions wheel ships the library (_extensions_pydll*.so) but no header, so
// these are declared here from the documented API (include/ortx_tokenizer.h and ortx_utils.h in
// microsoft/onnxruntime-extensions). Every call returns 0 on success; on failure
// OrtxGetLastErrorMessage() says why.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

struct OrtxObject;  // opaque: tokenizers and results are only passed back to the library

// Tokenizer files given as memory blobs: tokenizer_config.json and tokenizer.json.
struct OrtxTokenizerBlob {
  const char* config_json_blob;
  const char* vocab_json_blob;
  const char* token_module_blob;
  const char* raw_model_blob;
  const char* reserved_blob_1;
  size_t config_blob_len;
  size_t vocab_blob_len;
  size_t token_module_blob_len;
  size_t raw_model_blob_len;
  size_t reserved_blob_1_len;
};

int OrtxGetAPIVersion(void);
const char* OrtxGetLastErrorMessage(void);
int OrtxCreateTokenizerFromBlob(OrtxObject** tokenizer, const OrtxTokenizerBlob* blob);
int OrtxUpdateTokenizerOptions(OrtxObject* tokenizer, const char* keys[], const char* values[],
                               size_t count);
int OrtxTokenize(const OrtxObject* tokenizer, const char* input[], size_t batch_size,
                 OrtxObject** output);
int OrtxTokenId2DArrayGetBatch(const OrtxObject* array, size_t* length);
int OrtxTokenId2DArrayGetItem(const OrtxObject* array, size_t index, const uint32_t** item,
                              size_t* length);
int OrtxDisposeOnly(OrtxObject* object);

}  // extern "C"
