def test_tiny_run_has_adapter(tiny_run):
    assert (tiny_run / "adapter_model.safetensors").exists()
