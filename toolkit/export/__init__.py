"""What leaves a run: the adapter state_dict, the merged model and its verification, serving notes."""
