"""Export the attention-flow network of a sentence to GraphML, for Gephi or Cytoscape.

Run: python examples/export_graphml.py [OUT.graphml]
"""

import sys

from transformers import AutoModel, AutoTokenizer

import attnflow

out = sys.argv[1] if len(sys.argv) > 1 else "flow-network.graphml"
model_dir = attnflow.packaged_model_dir()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModel.from_pretrained(model_dir)
inputs = tokenizer(["Attention flows from layer to layer."], return_tensors="pt")
trace = attnflow.capture(model, tokens=tokenizer, **inputs)

# Vertices are (layer, token) with attributes layer, token, position and label ("L3:flows");
# edges run from layer l+1 down to layer l with attribute "capacity".
graph = attnflow.flow_network(trace, batch_index=0)
graph.write_graphml(out)
print(f"wrote {out}: {graph.vcount()} vertices, {graph.ecount()} edges")

# The max-flow between any output and input vertex is the (unnormalised) attention flow:
n = len(trace.tokens[0])
top, first = trace.num_layers * n, 0
print("flow from [CLS] at the top to [CLS] at the input:", graph.maxflow_value(top, first, capacity="capacity"))
