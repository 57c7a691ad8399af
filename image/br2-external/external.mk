include $(sort $(wildcard $(BR2_EXTERNAL_TRUSTBIND_PATH)/package/*/*.mk))
